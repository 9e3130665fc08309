"""The paper's CNN trained for real on the embedded MNIST: bp, sg and cdni reach measured floors,
the synthetic gradients come to point along the true ones, and decoupled training beats a control
whose hidden layers never learn; a checkpoint of the MLP is refused by a CNN run.

Run as a script (``python tests/test_cnn.py 0 1 2``) it prints the measured values per seed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from sgjax.core.trainer import TrainerState
from sgjax.data import DeviceData, load_dataset, sample_batch, scale_images, to_device
from sgjax.training.architecture import config_facts
from sgjax.training.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpointer,
    CheckpointError,
    _check_compatible,
)
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import PeriodMetrics, Resume, init_train_state
from sgjax.training.model import sample_shape, stages_for, trainer_for

# Two conv stages (depth 3) of 4 filters, 3x3 kernels, batch 32, Adam 3e-3, 300 steps; test
# accuracy on the first 2000 test images; cosines on a fixed probe batch of 256 training images.
TINY = dict(
    model="cnn",
    hidden_layers=2,
    filters=4,
    kernel_size=3,
    batch_size=32,
    learning_rate=3e-3,
    num_steps=300,
    lr_boundaries=(),
)
TEST_IMAGES = 2000
PROBE = 256
SEED = 0
# Measured 2026-11-26 on the 2-core CPU, shared with a benchmark (python tests/test_cnn.py 0 1):
#   seed 0: test accuracy bp 0.912, sg 0.773, cdni 0.863, frozen hidden layers 0.826;
#           cosine (boundary 1, 2) sg 0.000, 0.047; cdni -0.011, 0.056
#   seed 1: bp 0.908, sg 0.855, cdni 0.861, frozen 0.841; cosine sg 0.004, 0.017; cdni 0.074, 0.277
# Initial cosines are exactly 0 (zero-initialised synthesizers). In 300 steps only the top
# boundary (trained on the classifier's true gradient) aligns clearly; the lower one bootstraps
# from it and is still near 0. cdni beats the frozen control by 3.7 and 2.0 points; sg does not
# (seed 0: 0.773 < 0.826), so only cdni is held to the margin (half the smaller measured gap).
FLOORS = {"bp": 0.88, "sg": 0.74, "cdni": 0.84}
COSINE_FLOOR = {"sg": 0.01, "cdni": 0.02}
"""For the top boundary's synthetic gradient."""
FROZEN_MARGIN = 0.01


class Outcome(NamedTuple):
    accuracy: float
    cosines: list[float]
    initial_cosines: list[float]


def _program(mode: str, seed: int, frozen: bool = False) -> tuple[Callable, TrainerState]:
    """The whole run of the tiny CNN with ``mode`` (``frozen``: synthesizers never learn, so the
    hidden layers get zero gradients and only the classifier trains) as a traceable function of
    its initial state and the data: (test accuracy, final and initial cosines)."""
    config = TrainConfig(mode=mode, seed=seed, **TINY)
    trainer = trainer_for(config)
    if frozen:
        trainer = trainer.frozen_control()
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    state = trainer.init(init_key, jnp.zeros(sample_shape(config)))

    def whole(state: TrainerState, data: DeviceData) -> tuple[jax.Array, ...]:
        probe = sample_batch(jax.random.PRNGKey(12345), data, PROBE)

        def measure(s: TrainerState) -> jax.Array:
            if not config.decoupled:
                return jnp.zeros(0)
            return trainer.synthetic_gradient_cosines(s, probe.images, probe.labels)

        def body(s: TrainerState, i: jax.Array) -> tuple[TrainerState, None]:
            batch = sample_batch(jax.random.fold_in(data_key, i), data, config.batch_size)
            return trainer.step(s, batch.images, batch.labels)[0], None

        final = jax.lax.scan(body, state, jnp.arange(config.num_steps))[0]
        x = scale_images(data.test_images[:TEST_IMAGES])
        accuracy = trainer.evaluate(final, x, data.test_labels[:TEST_IMAGES])[1]
        return accuracy, measure(final), measure(state)

    return whole, state


def _outcome(accuracy: jax.Array, final: jax.Array, initial: jax.Array) -> Outcome:
    return Outcome(float(accuracy), final.tolist(), initial.tolist())


def train(mode: str, seed: int, frozen: bool = False) -> Outcome:
    """Train the tiny CNN with ``mode`` (see ``_program``)."""
    whole, state = _program(mode, seed, frozen)
    return _outcome(*jax.jit(whole)(state, to_device(load_dataset("mnist", None))))


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    """The four runs of ``train`` (bp, sg, cdni, frozen sg), compiled as one program."""
    runs = {mode: _program(mode, SEED) for mode in ("bp", "sg", "cdni")}
    runs["frozen"] = _program("sg", SEED, frozen=True)
    results = jax.jit(
        lambda states, data: {name: runs[name][0](states[name], data) for name in runs}
    )({name: run[1] for name, run in runs.items()}, to_device(load_dataset("mnist", None)))
    return {name: _outcome(*result) for name, result in results.items()}


@pytest.mark.parametrize("mode", ["bp", "sg", "cdni"])
def test_short_cnn_runs_reach_measured_floors(outcomes, mode: str):
    assert outcomes[mode].accuracy >= FLOORS[mode], outcomes[mode]


@pytest.mark.parametrize("mode", ["sg", "cdni"])
def test_synthetic_gradients_align_with_the_true_ones(outcomes, mode: str):
    outcome = outcomes[mode]
    assert outcome.initial_cosines == [0.0, 0.0]  # zero-initialised synthesizers
    assert outcome.cosines[-1] > COSINE_FLOOR[mode], outcome.cosines


def test_cdni_hidden_layers_learn(outcomes):
    """Beating the control whose hidden layers stay at their initialisation shows the synthetic
    gradients trained the convolutions, not just the classifier."""
    frozen = outcomes["frozen"]
    assert frozen.cosines == [0.0, 0.0]
    assert outcomes["cdni"].accuracy >= frozen.accuracy + FROZEN_MARGIN, (outcomes["cdni"], frozen)


@pytest.mark.parametrize(
    ("depth", "pool_min_size", "side"), [(6, 0, 1), (6, 7, 7), (6, 4, 4), (3, 7, 7)]
)
def test_pool_min_size_stops_the_pooling(depth, pool_min_size, side):
    """Stages pool (28 -> 14 -> 7 -> 4 -> 2 -> 1) only while their map is larger than the floor."""
    config = TrainConfig(
        mode="bp", model="cnn", hidden_layers=depth - 1, filters=2, pool_min_size=pool_min_size
    )
    h = jax.ShapeDtypeStruct((2, 784), jnp.float32)
    for stage in stages_for(config)[:-1]:
        h, _ = jax.eval_shape(lambda x, s=stage: s.init_with_output(jax.random.key(0), x, False), h)
    assert h.shape == (2, side, side, 2)
    unpooled = depth - 1 - {28: 0, 14: 1, 7: 2, 4: 3, 2: 4, 1: 5}[side]
    description = config_facts(config).description
    assert description.count("(Conv-BN-ReLU)") == (unpooled > 0), description
    assert f"+ {unpooled}x2 filters 5x5 (Conv-BN-ReLU) +" in description or not unpooled
    with pytest.raises(ConfigError, match="--pool_min_size=-1 is negative; use 0 or more"):
        dataclasses.replace(config, pool_min_size=-1).validate()


def test_an_mlp_checkpoint_is_refused_by_a_cnn_run(tmp_path):
    mlp = TrainConfig(mode="cdni", hidden_units=16, num_steps=10, eval_every=5)
    cnn = TrainConfig(mode="cdni", model="cnn", filters=4, num_steps=10, eval_every=5)
    checkpointer = Checkpointer(tmp_path)
    try:
        checkpointer.save(Resume(init_train_state(mlp), [], PeriodMetrics(), 0.0, 0.0), mlp)
        with pytest.raises(CheckpointError, match=r"the mlp network \(now cnn\)") as error:
            checkpointer.restore(cnn, jax.eval_shape(lambda: init_train_state(cnn)))
    finally:
        checkpointer.close()
    # The network is named, not each field the other network lacks.
    assert "was made with the mlp network (now cnn); resume" in str(error.value)


def test_a_cnn_checkpoint_from_before_pool_min_size_counts_as_0():
    cnn = TrainConfig(mode="cdni", model="cnn", filters=4)
    old = {"format": CHECKPOINT_FORMAT, "config": cnn.identity()}
    del old["config"]["pool_min_size"]
    _check_compatible(old, cnn.identity(), Path("ckpt"))  # resumes
    with pytest.raises(CheckpointError, match=r"--pool_min_size=None \(now 7\)"):
        _check_compatible(old, dataclasses.replace(cnn, pool_min_size=7).identity(), Path("ckpt"))


def test_a_checkpoint_older_than_a_field_resumes_while_that_field_is_off():
    """Any field added later (here synthetic_inputs) and off now (False, 0, None) matches a
    checkpoint that lacks it; turning it on is refused."""
    config = TrainConfig(mode="sg", hidden_units=16)
    old = {"format": CHECKPOINT_FORMAT, "config": config.identity()}
    del old["config"]["synthetic_inputs"]
    _check_compatible(old, config.identity(), Path("ckpt"))  # resumes
    unlocked = dataclasses.replace(config, synthetic_inputs=True).identity()
    with pytest.raises(CheckpointError, match=r"--synthetic_inputs=None \(now True\)"):
        _check_compatible(old, unlocked, Path("ckpt"))


if __name__ == "__main__":
    for seed in map(int, sys.argv[1:]):
        measured = {mode: train(mode, seed) for mode in ("bp", "sg", "cdni")}
        measured["frozen"] = train("sg", seed, frozen=True)
        print(json.dumps({"seed": seed} | {k: v._asdict() for k, v in measured.items()}))

"""The compiled training loop: accuracy floors, determinism, one compile per chunk shape."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from program_checks import value_types

import sgjax.training.loop as loop
from sgjax.core.trainer import Trainer, TrainerState
from sgjax.data import load_dataset, scale_images, to_device
from sgjax.training.config import TrainConfig
from sgjax.training.loop import (
    chunk_lengths,
    chunk_plan,
    init_train_state,
    make_run_chunk,
    train_and_evaluate,
)
from sgjax.training.model import trainer_for

# Floors measured on the embedded MNIST: 300 steps at learning rate 1e-3, test accuracy after 300
# steps over seeds 0-7 (BUILD_NOTES.md, "Learning floors across seeds"): bp 0.945-0.950, sg
# 0.826-0.859, cdni 0.837-0.858. Per-seed figures change with the CPU's floating-point kernels, so
# each floor sits well below the lowest of 8 seeds (0.015 to 0.057), and the seed-0 run is one
# draw from that spread on any machine.
FLOOR_CONFIG = dict(num_steps=300, eval_every=150, learning_rate=1e-3, sg_hidden_units=256)
ACCURACY_FLOORS = {"bp": 0.93, "sg": 0.78, "cdni": 0.78}

# Controls that can fail, measured on the same 300-step runs, seeds 0-7, on the first 512 training
# images:
# * Cosine between each boundary's synthetic gradient and the true dLoss/dh (bottom to top):
#   exactly 0 at step 0 (zero-initialised synthesizers); after 300 steps cdni's top boundary
#   0.172, 0.103, 0.101, 0.157, 0.054, 0.074, -0.021, 0.078 (median 0.090; seed 6 is below 0),
#   its lower boundaries -0.018 to 0.040; sg's every boundary -0.022 to 0.014. Only cdni's top
#   boundary, which regresses onto the true gradient itself, rises clearly at this learning rate
#   (1e-3 drives Adam's steps far past targets of size ~1e-4; at 1e-4 cdni reached
#   [0.09, 0.13, 0.98] while sg stayed at [-0.06, -0.09, -0.05]). One seed can land below 0, so
#   the test holds the median over seeds 0-5 (0.102 measured) above less than half of it; a
#   broken cdni (zero or frozen synthetic gradients) gives exactly 0.
# * Test accuracy against the same run with frozen hidden layers (synthesizers that never learn,
#   so every synthetic gradient stays 0 and only the output layer trains; the same run, bitwise,
#   for sg and cdni): margins over seeds 0-7 sg 0.065-0.109, cdni 0.076-0.113. The seed-0 run
#   must beat its control by 0.035, about half the smallest measured margin.
COSINE_SEEDS = 6
MEDIAN_COSINE_FLOOR = {"cdni": (None, None, 0.04)}
FROZEN_MARGIN = 0.035


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", None)


@pytest.fixture(scope="module")
def floor_runs(mnist):
    """``run(mode)``: the seed-0 floor run of ``mode``, trained once per module."""
    done = {}

    def run(mode: str) -> loop.RunResult:
        if mode not in done:
            config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
            done[mode] = train_and_evaluate(config, mnist, log=lambda _: None)
        return done[mode]

    return run


@pytest.fixture(scope="module")
def frozen_run(mnist, floor_runs):
    """The floor run with frozen hidden layers (synthesizers that never learn, so synthetic
    gradients stay 0 and only the output layer trains): the control of both sg and cdni, whose
    frozen runs are the same run (one initial network, zero hidden-layer updates)."""
    config = TrainConfig(mode="sg", seed=0, **FLOOR_CONFIG)
    # The sg run first: the loop's jitted init is keyed on the config, so the frozen run after it
    # starts from that cached state, while a frozen-first init would be reused by the sg run.
    floor_runs("sg")
    frozen = trainer_for(config).frozen_control()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "trainer_for", lambda _: frozen)
        return train_and_evaluate(config, mnist, log=lambda _: None)


def _final_cosines(mode: str, mnist, seeds: jax.Array, images, labels) -> np.ndarray:
    """Per seed and boundary, the cosine after the floor run of ``mode`` (the seeds' training
    vmapped in one program, no evaluations)."""
    config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
    trainer, data = trainer_for(config), to_device(mnist)
    sized = config.with_train_examples(data.train_images.shape[0])
    run = make_run_chunk(sized, config.num_steps)

    def final_cosines(seed: jax.Array) -> jax.Array:
        state, _ = run(init_train_state(sized, seed), data)
        return trainer.synthetic_gradient_cosines(state.model, images, labels)

    return np.asarray(jax.jit(jax.vmap(final_cosines))(seeds))


@pytest.mark.parametrize("mode", ["bp", "sg", "cdni"])
def test_short_run_reaches_floor_and_repeats_exactly(mode: str, mnist, floor_runs):
    config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
    first = floor_runs(mode)
    second = train_and_evaluate(config, mnist, log=lambda _: None)

    assert first.status == "completed"
    assert [r.step for r in first.records] == [150, 300]
    assert first.records[-1].test_accuracy >= ACCURACY_FLOORS[mode]
    assert first.records[-1].test_accuracy > first.records[0].test_accuracy - 0.02

    strip = lambda records: [r.__dict__ | {"elapsed_s": 0} for r in records]  # noqa: E731
    assert strip(first.records) == strip(second.records)
    chex.assert_trees_all_equal(first.state, second.state)


def _cosines(trainer: Trainer, models: list[TrainerState], images, labels) -> list[list[float]]:
    """Cosine between each boundary's synthetic gradient and the true one, over the batch, for
    each of ``models`` (one compiled program)."""
    cosines = jax.jit(
        lambda models: [trainer.synthetic_gradient_cosines(m, images, labels) for m in models]
    )(models)
    return [[float(c) for c in each] for each in cosines]


@pytest.mark.parametrize("mode", ["sg", "cdni"])
def test_synthetic_gradients_learn_and_beat_frozen_hidden_layers(
    mode: str, mnist, floor_runs, frozen_run
):
    config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
    trainer = trainer_for(config)
    images, labels = scale_images(mnist.train_images[:512]), jnp.asarray(mnist.train_labels[:512])
    trained = floor_runs(mode)

    at_start, after = _cosines(
        trainer, [init_train_state(config).model, trained.state.model], images, labels
    )
    assert at_start == [0.0] * config.hidden_layers
    print(f"{mode} cosines after {config.num_steps} steps: {[round(c, 3) for c in after]}")
    if mode in MEDIAN_COSINE_FLOOR:
        # Seed 0 is the run above; seeds 1 to COSINE_SEEDS-1 vmapped.
        others = _final_cosines(mode, mnist, jnp.arange(1, COSINE_SEEDS), images, labels)
        per_seed = [after, *others.tolist()]
        print(f"{mode} cosines per seed: {np.round(per_seed, 3).tolist()}")
        median = np.median(per_seed, axis=0).tolist()
        for floor, cosine in zip(MEDIAN_COSINE_FLOOR[mode], median, strict=True):
            assert floor is None or cosine > floor, median

    # Control: the same run whose synthesizers never learn (synthetic gradients stay 0, so the
    # hidden layers stay at their initialisation and only the output layer trains).
    hidden_now = [s.params for s in frozen_run.state.model.stages[:-1]]
    hidden_then = [s.params for s in init_train_state(config).model.stages[:-1]]
    chex.assert_trees_all_equal(hidden_now, hidden_then)  # the control is what it claims
    ours, theirs = trained.records[-1].test_accuracy, frozen_run.records[-1].test_accuracy
    print(f"{mode}: test accuracy {ours:.4f}, frozen hidden layers {theirs:.4f}")
    assert ours > theirs + FROZEN_MARGIN


def test_another_seed_gives_other_numbers(mnist):
    base = dict(mode="cdni", num_steps=20, eval_every=20, hidden_units=32)
    a = train_and_evaluate(TrainConfig(seed=0, **base), mnist, log=lambda _: None)
    b = train_and_evaluate(TrainConfig(seed=1, **base), mnist, log=lambda _: None)
    assert a.records[-1].train_loss != b.records[-1].train_loss


def test_chunk_plan_cuts_periods_the_same_way_from_any_boundary():
    plan = chunk_plan(0, 25, 10, 4)
    assert plan == [4, 4, 2, 4, 4, 2, 4, 1]
    boundaries = np.cumsum(plan)
    assert {10, 20, 25} <= set(boundaries)  # every evaluation point ends a chunk
    for i, boundary in enumerate(boundaries[:-1]):
        assert chunk_plan(int(boundary), 25, 10, 4) == plan[i + 1 :]
    assert chunk_plan(0, 500_000, 10_000, 1_000) == [1_000] * 500


def test_sub_chunks_change_only_the_rounding_of_training_means(mnist):
    base = dict(mode="bp", hidden_units=32, num_steps=40, eval_every=20, learning_rate=1e-3)
    whole = train_and_evaluate(TrainConfig(**base, chunk_steps=20), mnist, log=lambda _: None)
    pieces = train_and_evaluate(TrainConfig(**base, chunk_steps=7), mnist, log=lambda _: None)
    for a, b in zip(whole.records, pieces.records, strict=True):
        assert a.step == b.step
        assert a.test_loss == b.test_loss  # same parameters after the same steps
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


def test_chunk_lengths_cover_the_run():
    assert chunk_lengths(1000, 250) == [250] * 4
    assert chunk_lengths(1001, 250) == [250] * 4 + [1]
    assert chunk_lengths(5, 10) == [5]


@pytest.mark.parametrize("mode", ["bp", "sg"])
def test_a_chunk_returns_a_state_of_the_types_it_was_given(mode: str, mnist):
    """One compiled chunk serves the whole run: a chunk maps the state to one of the same
    shapes, dtypes and weak types (a drifting dtype would make every chunk compile again)."""
    config = TrainConfig(mode=mode, hidden_units=32, sg_hidden_units=32, num_steps=30)
    run_chunk = jax.jit(make_run_chunk(config, 10))
    state = init_train_state(config)
    data = to_device(mnist)
    losses = []
    for _ in range(3):
        new, metrics = run_chunk(state, data)
        assert value_types(new) == value_types(state)
        state = new
        losses.append(float(metrics.loss))
    assert int(state.step) == 30
    assert len(set(losses)) == 3


def test_learning_rate_in_records_follows_the_schedule(mnist):
    config = TrainConfig(mode="bp", hidden_units=16, num_steps=10, eval_every=1, learning_rate=1e-3)
    result = train_and_evaluate(config, mnist, log=lambda _: None)
    rates = [r.learning_rate for r in result.records]
    # Record k describes steps up to k; step index k-1 used the rate shown (boundaries 6, 8).
    assert rates == pytest.approx([1e-3] * 6 + [1e-4] * 2 + [1e-5] * 2, rel=1e-5)

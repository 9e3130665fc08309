"""NNX modules as stages (issue 20): the same ``Trainer`` on ``nnx.Module`` instances, functions
``rngs -> nnx.Module`` and mixes with Linen; every check against a control that must differ.

The layer-parallel case runs this file as a script on 2 simulated CPU devices (the flag must be
set before JAX starts); it prints one JSON object that the test checks.
"""

from __future__ import annotations

import json
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from program_checks import assert_vmap_equals_separate_runs

import sgjax
from sgjax.core.layers import HiddenBlock, OutputLayer, apply_module
from sgjax.core.methods import with_oracle
from sgjax.core.trainer import Trainer

BATCH, IN, UNITS, CLASSES = 16, 20, 12, 10


class Hidden(nnx.Module):
    """``HiddenBlock`` in NNX (Dense -> BatchNorm -> ReLU, optional Dropout); its attributes sort
    like the Linen block's variables (BatchNorm_0 < Dense_0), so their leaves line up."""

    def __init__(self, din: int, features: int, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.batch_norm = nnx.BatchNorm(features, momentum=0.99, epsilon=1e-5, rngs=rngs)
        self.dense = nnx.Linear(din, features, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.batch_norm(self.dense(x.reshape((x.shape[0], -1)))))
        return self.drop(h) if self.drop else h


class Normed(nnx.Module):
    """Dense -> LayerNorm -> tanh, optional Dropout."""

    def __init__(self, din: int, features: int, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.dense = nnx.Linear(din, features, rngs=rngs)
        self.norm = nnx.LayerNorm(features, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.drop(jnp.tanh(self.norm(self.dense(x))))


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (BATCH, IN)), jax.random.randint(ky, (BATCH,), 0, CLASSES)


def _trainer(stages: list, method: sgjax.Method) -> Trainer:
    return Trainer(stages, method, sgjax.cross_entropy, optax.adam(1e-2), accuracy=sgjax.accuracy)


def _difference(a: Any, b: Any) -> float:
    """Largest absolute difference between the leaves of two pytrees (in order)."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0)) for x, y in pairs)


def _nonzero_synthesizers(state: sgjax.TrainerState) -> sgjax.TrainerState:
    leaves, tree = jax.tree_util.tree_flatten([s.params for s in state.synthesizers])
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = jax.tree_util.tree_unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    return state._replace(
        synthesizers=tuple(
            s._replace(params=p) for s, p in zip(state.synthesizers, noisy, strict=True)
        )
    )


def test_oracle_dni_equals_backprop_on_an_nnx_chain() -> None:
    """BatchNorm and LayerNorm NNX stages: oracle DNI's step is backprop's, parameters and
    BatchNorm statistics (which the step moved); DNI with its own synthetic gradients differs."""
    x, y = _batch()
    dni = sgjax.dni(sgjax.synthesizers.dense(1, 8))
    bp, oracle, sg = (
        _trainer(
            [
                Hidden(IN, UNITS, rngs=nnx.Rngs(0)),
                Normed(UNITS, UNITS, rngs=nnx.Rngs(1)),
                nnx.Linear(UNITS, CLASSES, rngs=nnx.Rngs(2)),
            ],
            method,
        )
        for method in (sgjax.backprop(), with_oracle(dni), dni)
    )
    start = _nonzero_synthesizers(oracle.init(jax.random.PRNGKey(0), x))
    # The three steps compiled as one program (one compile instead of three).
    (after_bp, m_bp), (after_oracle, m_oracle), (after_sg, _) = jax.jit(
        lambda states, x, y: [
            t.step(s, x, y) for t, s in zip((bp, oracle, sg), states, strict=True)
        ]
    )((bp.init(jax.random.PRNGKey(0), x), start, start), x, y)
    assert set(after_bp.stages[0].collections) == {"batch_stats"}
    for field in ("params", "collections"):
        chex.assert_trees_all_close(
            [getattr(s, field) for s in after_oracle.stages],
            [getattr(s, field) for s in after_bp.stages],
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_allclose(m_oracle.loss, m_bp.loss, rtol=1e-6)
    moved = _difference(after_bp.stages[0].collections, start.stages[0].collections)
    assert moved > 1e-3  # training mode: the running averages moved
    hidden = lambda s: [st.params for st in s.stages[:-1]]  # noqa: E731
    assert _difference(hidden(after_sg), hidden(after_bp)) > 1e-4


# Every method, on the Linen chain and on the same chain with its middle stage in NNX.
METHODS = {
    "bp": (sgjax.backprop(), {}),
    "cdni": (sgjax.dni(sgjax.synthesizers.dense(1, 8), conditioned=True), {}),
    "bp_lambda": (sgjax.bp_lambda(0.5, sgjax.synthesizers.dense(0)), {}),
    "zero_grad": (sgjax.zero_gradient(), {}),
    "stale_grad_example": (
        sgjax.per_example_stale_gradient(BATCH, 0.5),
        {"example_ids": jnp.arange(BATCH)},
    ),
    "dgl": (sgjax.dgl(), {}),
    "dni_p": (sgjax.dni(sgjax.synthesizers.dense(0)), {"update_prob": 0.5}),
    "unlock": (sgjax.dni(sgjax.synthesizers.dense(0), synthetic_inputs=True, input_units=8), {}),
}


# Half of them in the fast core (each compiles two programs); all in the full suite.
@pytest.mark.parametrize(
    "name",
    [
        n if n in ("bp", "cdni", "dgl", "unlock") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(METHODS)
    ],
)
def test_a_mixed_chain_trains_as_its_linen_twin(name: str) -> None:
    """[Linen, NNX, Linen] started from the Linen chain's variables (their leaves line up)
    takes the Linen chain's three steps, for every method, and evaluates as it does (BatchNorm's
    running averages); started from NNX's own initialisation (the control) it does not."""
    method, extra = METHODS[name]
    x, y = _batch(1)
    linen = _trainer([HiddenBlock(UNITS), HiddenBlock(UNITS), OutputLayer(CLASSES)], method)
    mixed = _trainer(
        [HiddenBlock(UNITS), Hidden(UNITS, UNITS, rngs=nnx.Rngs(5)), OutputLayer(CLASSES)], method
    )

    def run(trainer: Trainer, state: Any) -> tuple[Any, jax.Array]:
        def step(state: Any, i: jax.Array) -> tuple[Any, None]:
            # With update_prob, every stage updates and skips with these keys.
            key = jax.random.fold_in(jax.random.PRNGKey(1), i) if "update_prob" in extra else None
            return trainer.step(state, x, y, key=key, **extra)[0], None

        state = jax.lax.scan(step, state, jnp.arange(3))[0]
        return state, trainer.apply(state, x)

    start = linen.init(jax.random.PRNGKey(0), x)
    own = mixed.init(jax.random.PRNGKey(0), x)
    poured = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(own), jax.tree_util.tree_leaves(start)
    )
    # The three runs compiled as one program.
    (want, want_logits), (got, got_logits), (control, _) = jax.jit(
        lambda start, poured, own: (run(linen, start), run(mixed, poured), run(mixed, own))
    )(start, poured, own)
    assert _difference(got, want) < 2e-5
    assert _difference(got_logits, want_logits) < 2e-5
    assert _difference(control, want) > 1e-2
    trained = lambda s: (s.stages[1].params, s.stages[1].collections)  # noqa: E731
    assert _difference(trained(got), trained(poured)) > 1e-3  # the NNX stage moved


def test_vmap_over_seeds_equals_separate_runs() -> None:
    """Stages given as functions ``rngs -> nnx.Module`` are built from each seed's key (Dropout
    streams included): vmapped seeds equal separate runs, and the seeds differ."""
    x, y = _batch(10)
    stages = [
        lambda rngs: Normed(IN, UNITS, rngs=rngs, dropout=0.3),
        lambda rngs: Normed(UNITS, UNITS, rngs=rngs),
        lambda rngs: nnx.Linear(UNITS, CLASSES, rngs=rngs),
    ]
    trainer = _trainer(stages, sgjax.dni(sgjax.synthesizers.dense(0), conditioned=True))

    def run(seed: jax.Array) -> tuple[jax.Array, Any]:
        state = trainer.init(jax.random.PRNGKey(seed), x)
        state, losses = jax.lax.scan(lambda s, _: trainer.step(s, x, y), state, length=3)
        return losses.loss[-1], state

    assert_vmap_equals_separate_runs(run)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    first = jax.jit(jax.vmap(trainer.init, (0, None)))(keys, x)  # jitted: faster than op by op
    assert (
        _difference(
            first.stages[0].params["dense"]["kernel"][0],
            first.stages[0].params["dense"]["kernel"][1],
        )
        > 1e-2
    )
    # An instance keeps its own variables whatever the key.
    instance = _trainer([Normed(IN, UNITS, rngs=nnx.Rngs(0)), *stages[1:]], sgjax.backprop())
    init = jax.jit(instance.init)
    a, b = (init(jax.random.PRNGKey(k), x).stages[0] for k in (0, 1))
    chex.assert_trees_all_equal(a.params, b.params)


def test_dropout_draws_from_the_rng_state_and_apply_evaluates() -> None:
    """The Dropout stream's counter is in the state: a step is a pure function of it (the same
    state, the same step; another count, another mask); evaluation mode drops nothing."""
    x, y = _batch(2)
    stages = [
        Normed(IN, UNITS, rngs=nnx.Rngs(0), dropout=0.5),
        nnx.Linear(UNITS, CLASSES, rngs=nnx.Rngs(1)),
    ]
    trainer = _trainer(stages, sgjax.backprop())
    state = trainer.init(jax.random.PRNGKey(0), x)
    rngs = state.stages[0].collections["rngs"]
    step = jax.jit(trainer.step)
    after, m1 = step(state, x, y)
    again, m2 = step(state, x, y)
    chex.assert_trees_all_equal(after, again)
    assert int(jax.tree_util.tree_leaves(after.stages[0].collections["rngs"])[0]) == 1
    bumped = jax.tree_util.tree_map(lambda c: c + 1 if c.ndim == 0 else c, rngs)
    other = state._replace(
        stages=(state.stages[0]._replace(collections={"rngs": bumped}), *state.stages[1:])
    )
    assert float(jnp.abs(step(other, x, y)[1].loss - m1.loss)) > 1e-4
    first = after.stages[0]
    training, _ = apply_module(trainer.stages[0], first.params, first.collections, x, train=True)
    evaluation, _ = apply_module(trainer.stages[0], first.params, first.collections, x, train=False)
    assert float(jnp.mean(training == 0)) > 0.3  # dropped in training only
    assert float(jnp.mean(evaluation == 0)) == 0


@pytest.mark.slow  # training-loop runs
def test_an_nnx_run_resumes_bitwise_through_the_training_loop(tmp_path, monkeypatch) -> None:
    """The configured loop on an NNX chain (BatchNorm, Dropout): stopped mid-period,
    checkpointed, restored from disk, finished: the uninterrupted run exactly. The control:
    resumed with the Dropout counters reset, it is not."""
    from sgjax.training import model
    from sgjax.training.checkpoint import Checkpointer
    from sgjax.training.config import TrainConfig
    from sgjax.training.loop import init_train_state, train_and_evaluate

    monkeypatch.setattr(
        model,
        "stages_for",
        lambda config: [
            lambda rngs: Hidden(784, 16, rngs=rngs, dropout=0.2),
            lambda rngs: Hidden(16, 16, rngs=rngs),
            lambda rngs: nnx.Linear(16, 10, rngs=rngs),
        ],
    )
    config = TrainConfig(
        mode="cdni",
        num_steps=20,
        eval_every=10,
        chunk_steps=5,
        batch_size=16,
        hidden_layers=2,
        sg_hidden_units=16,
        learning_rate=1e-3,
    )
    dataset = sgjax.load_dataset("mnist", None)
    quiet = dict(log=lambda _: None)
    whole = train_and_evaluate(config, dataset, **quiet)
    checkpointer = Checkpointer(tmp_path)
    chunks = iter(range(1000))
    stopped = train_and_evaluate(
        config,
        dataset,
        save_checkpoint=lambda point: checkpointer.save(point, config),
        stop_requested=lambda: next(chunks) == 2,
        **quiet,
    )
    checkpointer.close()
    assert stopped.status == "interrupted" and stopped.steps_done == 15

    def restored() -> Any:  # (a run donates its start's buffers)
        checkpointer = Checkpointer(tmp_path)
        start = checkpointer.restore(config, jax.eval_shape(lambda: init_train_state(config)))
        checkpointer.close()
        return start

    start = restored()
    assert int(jax.tree_util.tree_leaves(start.state.model.stages[0].collections["rngs"])[0]) == 15
    resumed = train_and_evaluate(config, dataset, start=start, **quiet)
    strip = lambda records: [r.__dict__ | {"elapsed_s": 0} for r in records]  # noqa: E731
    assert strip(resumed.records) == strip(whole.records)
    chex.assert_trees_all_equal(resumed.state, whole.state)
    control = restored()
    first, *rest = control.state.model.stages
    reset = jax.tree_util.tree_map(lambda c: c * 0 if c.ndim == 0 else c, first.collections)
    model_state = control.state.model._replace(stages=(first._replace(collections=reset), *rest))
    control = control._replace(state=control.state._replace(model=model_state))
    controlled = train_and_evaluate(config, dataset, start=control, **quiet)
    assert _difference(controlled.state.model.stages, whole.state.model.stages) > 1e-5


class NoX(nnx.Module):
    def __call__(self) -> jax.Array:
        return jnp.zeros(())


class WantsTrain(nnx.Module):
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return x


class NotCallable(nnx.Module):
    pass


@pytest.mark.parametrize(
    "stage",
    [3, "dense", jax.nn.relu, lambda rngs: 3, NoX(), WantsTrain(), NotCallable(), nn.Dense],
    ids=["int", "str", "function", "maker_of_an_int", "no_x", "wants_train", "no_call", "class"],
)
def test_a_stage_the_trainer_cannot_use_is_refused_in_one_line(stage: Any) -> None:
    with pytest.raises(TypeError, match=r"an nnx\.Module called as stage\(x\)") as error:
        _trainer([stage, OutputLayer(CLASSES)], sgjax.backprop())
    assert "\n" not in str(error.value)
    # The control: what it says is accepted is.
    good = [nnx.Linear(IN, 4, rngs=nnx.Rngs(0)), lambda rngs: nnx.Linear(4, 3, rngs=rngs)]
    trainer = _trainer([*good, OutputLayer(CLASSES)], sgjax.backprop())
    assert trainer.apply(trainer.init(jax.random.PRNGKey(0), _batch()[0]), _batch()[0]).shape == (
        BATCH,
        CLASSES,
    )


def _engine_run(trainer: Trainer, batches: Any, start: Any, schedule: Any, devices: int):
    """``schedule``'s minibatches by ``PipelineEngine`` on ``devices``: the model, the placement."""
    from sgjax.parallel.spmd import PipelineEngine

    engine = PipelineEngine(trainer, batches, start, schedule, num_devices=devices)
    engine.compile({schedule.num_steps})
    engine.advance(schedule.num_steps)
    return engine.state().model, [int(d) for d in engine.stage_devices()]


def pipeline_results() -> dict[str, Any]:
    """An NNX chain (LayerNorm blocks, a Linen head) pipelined on 2 devices by
    ``PipelineEngine``: GPipe with 2 microbatches against ``Trainer.step`` on one device
    (LayerNorm is per example, so microbatches do not change the step; the control: the
    reference one minibatch off), and the DNI pipeline against itself on one device (the
    control: the initial state)."""
    from sgjax.data import sample_batch, to_device
    from sgjax.parallel.layers import image_batches
    from sgjax.parallel.schedules import Schedule
    from sgjax.training.loop import TrainState

    assert len(jax.devices()) == 2, jax.devices()
    dataset = sgjax.load_dataset("mnist", None)
    key, n, size = jax.random.PRNGKey(5), 6, 32
    batches, data = image_batches(dataset, size), to_device(dataset)
    stages = [
        lambda rngs: Normed(784, 32, rngs=rngs),
        Normed(32, 32, rngs=nnx.Rngs(1)),
        OutputLayer(10),
    ]
    out: dict[str, Any] = {}
    for name, method, kind, micro in [
        ("gpipe", sgjax.backprop(), "bp_gpipe", 2),
        ("dni", sgjax.dni(sgjax.synthesizers.dense(0), conditioned=True), "sg_pipeline", 1),
    ]:
        trainer = _trainer(stages, method)
        initial = trainer.init(jax.random.PRNGKey(0), np.zeros((1, 784), np.float32))
        start = TrainState(initial, jnp.int32(0), key)

        schedule = Schedule(kind, n, size, microbatches=micro)
        got, devices = _engine_run(trainer, batches, start, schedule, 2)
        if name == "gpipe":
            step = jax.jit(trainer.step)
            same = control = initial
            for b in range(n + 1):
                batch = sample_batch(jax.random.fold_in(key, b), data, size)
                same = step(same, batch.images, batch.labels)[0] if b < n else same
                control = step(control, batch.images, batch.labels)[0] if b > 0 else control
        else:
            same, control = _engine_run(trainer, batches, start, schedule, 1)[0], initial
        out[name] = {
            "devices": devices,
            "difference": _difference(got, same),
            "control": _difference(got, control),
        }
    return out


@pytest.mark.slow  # a 2-device subprocess
def test_the_layer_parallel_engine_on_an_nnx_chain_equals_one_device() -> None:
    from local_processes import script_json

    for name, got in script_json(__file__, 2).items():
        assert len(set(got["devices"])) == 2, (name, got)
        assert got["difference"] < 2e-5, (name, got)
        assert got["control"] > 1e-3, (name, got)


if __name__ == "__main__":
    print(json.dumps(pipeline_results()))

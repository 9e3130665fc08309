"""The synthesizer warm-up (``dni(..., warmup_steps=N)``, ``--sg_warmup_steps``): steps below N
are backprop's while the synthesizers regress onto the true gradient (the oracle's step), later
steps are DNI's, one traced program serves both, and N=0 is DNI's program exactly."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest
from absl import flags

from sgjax.cli.train import define_script_flags, script_config
from sgjax.core import synthesizers
from sgjax.core.layers import accuracy, cross_entropy
from sgjax.core.methods import backprop, dni
from sgjax.core.optim import adam
from sgjax.core.trainer import Trainer
from sgjax.data import load_dataset, to_device
from sgjax.models.mlp import mlp_stages
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import init_train_state, make_run_chunk

WARMUP = 3
SYNTHESIZER = synthesizers.dense(1, 8)
CLOSE = dict(rtol=1e-5, atol=1e-6)


def _trainer(method) -> Trainer:
    return Trainer(mlp_stages(3, 12, 10), method, cross_entropy, adam(1e-2), accuracy=accuracy)


def _batch(seed: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (16, 20)), jax.random.randint(ky, (16,), 0, 10)


def _stages(state):
    return [(s.params, s.collections) for s in state.stages]


def _distance(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def _run(step, state, start: int, stop: int):
    for t in range(start, stop):
        state, _ = step(state, *_batch(t), t)
    return state


def _references(*methods):
    """One step of each method's trainer from its own state, compiled as one program."""
    trainers = [_trainer(m) for m in methods]
    step = jax.jit(
        lambda states, x, y: [t.step(s, x, y)[0] for t, s in zip(trainers, states, strict=True)]
    )
    return lambda states, x, y, t: (step(states, x, y), None)


def test_warmup_is_backprop_fitting_the_synthesizers_then_dni_in_one_program() -> None:
    warm = _trainer(dni(SYNTHESIZER, warmup_steps=WARMUP))
    traces = []

    def traced(state, x, y, t):
        traces.append(t)
        return warm.step(state, x, y, step=t)

    warm_step = jax.jit(traced)
    # backprop, the oracle and DNI stepped side by side (one compiled program)
    references = _references(backprop(), dni(SYNTHESIZER, oracle=True), dni(SYNTHESIZER))
    start = warm.init(jax.random.PRNGKey(0), _batch(0)[0])

    warmed = _run(warm_step, start, 0, WARMUP)
    by_bp, by_oracle, by_sg = _run(references, [start] * 3, 0, WARMUP)
    chex.assert_trees_all_close(_stages(warmed), _stages(by_bp), **CLOSE)
    chex.assert_trees_all_close(warmed.synthesizers, by_oracle.synthesizers, **CLOSE)
    # Teeth: DNI's steps (zero-initialised synthesizers) give other stages, and the synthesizers
    # did learn during the warm-up.
    assert _distance(_stages(by_sg), _stages(by_bp)) > 1e-3
    assert _distance(warmed.synthesizers, start.synthesizers) > 1e-3

    # From step N on the same compiled function takes DNI's step, not backprop's.
    after = _run(warm_step, warmed, WARMUP, WARMUP + 2)
    then_bp, _, then_sg = _run(references, [warmed] * 3, WARMUP, WARMUP + 2)
    chex.assert_trees_all_close(after, then_sg, **CLOSE)
    assert _distance(_stages(after), _stages(then_bp)) > 1e-4
    assert len(traces) == 1


def test_no_warmup_is_dni_program_exactly() -> None:
    x, y = _batch(0)
    sg, zero = _trainer(dni(SYNTHESIZER)), _trainer(dni(SYNTHESIZER, warmup_steps=0))
    state = sg.init(jax.random.PRNGKey(0), x)
    plain = jax.make_jaxpr(lambda s, t: sg.step(s, x, y))(state, 5)
    assert str(jax.make_jaxpr(lambda s, t: zero.step(s, x, y, step=t))(state, 5)) == str(plain)


def test_warmup_refusals_and_records() -> None:
    x, y = _batch(0)
    warm = _trainer(dni(SYNTHESIZER, warmup_steps=2))
    with pytest.raises(ValueError, match="pass step="):
        warm.step(warm.init(jax.random.PRNGKey(0), x), x, y)
    with pytest.raises(ValueError, match="non-negative"):
        dni(SYNTHESIZER, warmup_steps=-1)
    with pytest.raises(ValueError, match="drop synthetic_inputs"):
        dni(SYNTHESIZER, warmup_steps=2, synthetic_inputs=True)
    for fields in (
        dict(mode="bp"),
        dict(mode="dgl"),
        dict(mode="sg", synthetic_inputs=True),
        dict(mode="sg", parallel="layers"),
    ):
        with pytest.raises(ConfigError, match="--sg_warmup_steps=5"):
            TrainConfig(sg_warmup_steps=5, **fields)
    with pytest.raises(ConfigError, match="--sg_warmup_steps=-1"):
        TrainConfig(sg_warmup_steps=-1)
    fv = flags.FlagValues()
    define_script_flags(fv, "mlp")
    fv(["mnist_mlp.py", "--mode=cdni", "--sg_warmup_steps=7"])
    assert script_config(fv, "mlp").sg_warmup_steps == 7
    # Records (results.json, checkpoints) name it only when it is set: older ones still match.
    assert "sg_warmup_steps" not in TrainConfig().recorded()
    assert TrainConfig(mode="cdni", sg_warmup_steps=5).recorded()["sg_warmup_steps"] == 5


def test_the_training_loop_warms_up_by_its_step_counter() -> None:
    data = to_device(load_dataset("mnist", None))
    tiny = dict(
        hidden_units=16, sg_hidden_units=16, batch_size=32, num_steps=10, learning_rate=0.01
    )

    warm, bp = TrainConfig(**tiny, mode="sg", sg_warmup_steps=4), TrainConfig(**tiny, mode="bp")
    chunks = [make_run_chunk(config, 4) for config in (warm, bp)]

    # Both runs compiled as one program. Without the step counter it would refuse; DNI's steps
    # differ (the first test's control).
    warmed, by_bp = jax.jit(
        lambda states, data: [c(s, data)[0].model for c, s in zip(chunks, states, strict=True)]
    )([init_train_state(warm), init_train_state(bp)], data)
    chex.assert_trees_all_close(_stages(warmed), _stages(by_bp), **CLOSE)

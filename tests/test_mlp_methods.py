"""The configured MLP (``trainer_for(config)``) under bp, sg and cdni: the oracle invariant, the
same initial network whatever the mode, synthesizers that learn, one compile per step.

The generic Trainer properties (other chains, zero-initialised synthesizers, vmap, an independent
DNI reference) are in test_trainer.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from program_checks import value_types

from sgjax.core.methods import with_oracle
from sgjax.core.trainer import Trainer, TrainerState
from sgjax.training.config import TrainConfig
from sgjax.training.loop import init_train_state
from sgjax.training.model import trainer_for

TINY = dict(hidden_units=16, sg_hidden_units=32, learning_rate=1e-3)


def _batch(seed: int = 1, size: int = 32, dim: int = 20) -> tuple[jax.Array, jax.Array]:
    key_x, key_y = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.uniform(key_x, (size, dim)), jax.random.randint(key_y, (size,), 0, 10)


def _randomise_synthesizers(state: TrainerState, key: jax.Array) -> TrainerState:
    """Non-zero synthesizer output layers, so that synthetic gradients are not zero."""
    synthesizers = []
    for i, synth in enumerate(state.synthesizers):
        params = dict(synth.params)
        last = max((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:]))
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params[last] = {
            "kernel": 0.1 * jax.random.normal(k1, params[last]["kernel"].shape),
            "bias": 0.1 * jax.random.normal(k2, params[last]["bias"].shape),
        }
        synthesizers.append(synth._replace(params=params))
    return state._replace(synthesizers=tuple(synthesizers))


def _oracle(trainer: Trainer) -> Trainer:
    assert trainer.method.name in ("sg", "cdni")
    method = with_oracle(trainer.method)
    return Trainer(
        trainer.stages, method, trainer.loss, trainer.optimizer, accuracy=trainer.accuracy
    )


def _max_abs_difference(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize("hidden_layers", [1, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["sg", "cdni"])
def test_oracle_step_of_the_configured_mlp_equals_backprop(hidden_layers: int, mode: str):
    config = TrainConfig(mode=mode, hidden_layers=hidden_layers, sg_hidden_layers=1, **TINY)
    bp = trainer_for(TrainConfig(mode="bp", hidden_layers=hidden_layers, **TINY))
    sg = trainer_for(config)
    oracle = _oracle(sg)
    images, labels = _batch()
    key = jax.random.PRNGKey(hidden_layers)
    bp_state = bp.init(key, images)
    sg_state = _randomise_synthesizers(sg.init(key, images), jax.random.PRNGKey(7))
    assert len(sg_state.synthesizers) == hidden_layers

    # The three steps and the true boundary gradients compiled as one program (one compile).
    (after_bp, m_bp), (after_oracle, m_oracle), (after_sg, _), true = jax.jit(
        lambda states, x, y: [
            *(t.step(s, x, y) for t, s in zip((bp, oracle, sg), states, strict=True)),
            sg.boundary_gradients(states[1], x, y),
        ]
    )((bp_state, sg_state, sg_state), images, labels)
    chex.assert_trees_all_close(
        [s.params for s in after_oracle.stages],
        [s.params for s in after_bp.stages],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(m_oracle.loss, m_bp.loss, rtol=1e-6)
    assert m_oracle.sg_loss.shape == (hidden_layers,)

    # The comparison has teeth: the synthesizers' own gradients give another first block, and
    # the true gradients are not all zero.
    assert _max_abs_difference(after_sg.stages[0].params, after_bp.stages[0].params) > 1e-4
    assert max(float(jnp.max(jnp.abs(g))) for g in true) > 1e-4


def test_every_mode_starts_from_the_same_network():
    states = {
        mode: init_train_state(TrainConfig(mode=mode, hidden_layers=3, **TINY))
        for mode in ("bp", "sg", "cdni")
    }
    for mode in ("sg", "cdni"):
        chex.assert_trees_all_equal(states[mode].model.stages, states["bp"].model.stages)
        assert len(states[mode].model.synthesizers) == 3
    assert states["bp"].model.synthesizers == ()


@pytest.mark.parametrize(("mode", "sg_hidden_layers"), [("cdni", 0), ("sg", 2)])
def test_synthesizer_loss_falls_on_a_fixed_batch(mode: str, sg_hidden_layers: int):
    """Train only the top synthesizer towards the fixed true gradient t_L; its loss must fall far.

    (A linear synthesizer needs the label: t_L = W_out^T (softmax - onehot) is linear in it.)
    """
    config = TrainConfig(
        mode=mode,
        hidden_layers=2,
        hidden_units=16,
        sg_hidden_layers=sg_hidden_layers,
        sg_hidden_units=32,
        learning_rate=3e-3,
    )
    trainer = trainer_for(config)
    images, labels = _batch(size=64)
    state = trainer.init(jax.random.PRNGKey(0), images)

    @jax.jit
    def synthesizer_update(top):
        model = state._replace(synthesizers=(*state.synthesizers[:-1], top))
        forwards, grads, _, _ = trainer.gradients(model, images, labels)
        top = trainer.update_synthesizer(
            top, grads[-1].synthesizer, forwards[-1].synthesizer_collections
        )
        return top, grads[-1].sg_loss

    top, losses = state.synthesizers[-1], []
    for _ in range(300):
        top, loss = synthesizer_update(top)
        losses.append(float(loss))
    assert losses[0] > 0
    print(f"sg loss {losses[0]:.3g} -> {np.mean(losses[-10:]):.3g}")
    assert np.mean(losses[-10:]) < 0.2 * losses[0], (losses[0], losses[-10:])


@pytest.mark.parametrize("mode", ["bp", "sg", "cdni"])
def test_train_step_returns_a_state_of_the_types_it_was_given(mode: str):
    """One compiled step serves every step: it maps the state to one of the same structure,
    shapes, dtypes and weak types (a drifting dtype would make each step compile again)."""
    trainer = trainer_for(TrainConfig(mode=mode, hidden_layers=2, **TINY))
    step = jax.jit(trainer.step)
    state = trainer.init(jax.random.PRNGKey(0), _batch()[0])
    losses = []
    for seed in range(3):
        new, metrics = step(state, *_batch(seed))
        assert value_types(new) == value_types(state)
        state = new
        losses.append(float(metrics.loss))
    assert len(set(losses)) == 3

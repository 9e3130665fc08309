"""Issue 12's methods on a tiny chain: stochastic updates, BP(lambda), the complete unlock,
greedy local learning and the baselines, each checked against the method it must reduce to."""

from __future__ import annotations

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgjax.core import synthesizers
from sgjax.core.layers import HiddenBlock, OutputLayer, accuracy, apply_module, cross_entropy
from sgjax.core.methods import (
    backprop,
    bp_lambda,
    dgl,
    dni,
    per_example_stale_gradient,
    stale_gradient,
    zero_gradient,
)
from sgjax.core.optim import adam
from sgjax.core.trainer import Trainer

BATCH, IN, UNITS, CLASSES = 16, 20, 12, 10
SYNTH = synthesizers.dense(1, 8)


def _stages():
    return [HiddenBlock(UNITS), HiddenBlock(UNITS), OutputLayer(CLASSES)]


def _trainer(method, optimizer=None) -> Trainer:
    return Trainer(_stages(), method, cross_entropy, optimizer or adam(1e-2), accuracy=accuracy)


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (BATCH, IN)), jax.random.randint(ky, (BATCH,), 0, CLASSES)


def _nonzero_synthesizers(state, key):
    """Random synthesizer parameters, so that synthetic and true gradients really differ."""
    leaves, tree = jax.tree_util.tree_flatten([s.params for s in state.synthesizers])
    keys = jax.random.split(key, len(leaves))
    noisy = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    params = jax.tree_util.tree_unflatten(tree, noisy)
    synths = tuple(s._replace(params=p) for s, p in zip(state.synthesizers, params, strict=True))
    return state._replace(synthesizers=synths)


def _stepper(trainer: Trainer):
    return jax.jit(lambda s, x, y, k, p: trainer.step(s, x, y, key=k, update_prob=p)), jax.jit(
        trainer.step
    )


@pytest.fixture(scope="module")
def setups():
    """Per method: trainer, a state with non-zero synthesizers, the stochastic and plain steps."""
    x, _ = _batch()
    out = {}
    for name, method in {
        "bp": backprop(),
        "dni": dni(SYNTH),
        "unlock": dni(SYNTH, conditioned=True, synthetic_inputs=True, input_units=8),
    }.items():
        trainer = _trainer(method)
        state = jax.jit(trainer.init)(jax.random.PRNGKey(0), x)
        if name in ("dni", "unlock"):
            state = _nonzero_synthesizers(state, jax.random.PRNGKey(5))
        out[name] = (trainer, state, *_stepper(trainer))
    return out


@pytest.mark.parametrize("name", ["bp", "dni", "unlock"])
def test_update_prob_one_is_the_plain_step_and_zero_changes_nothing(setups, name):
    trainer, state, stochastic, plain = setups[name]
    x, y = _batch(1)
    key = jax.random.PRNGKey(7)
    reference, metrics = plain(state, x, y)
    at_one, metrics_one = stochastic(state, x, y, key, jnp.float32(1.0))
    chex.assert_trees_all_equal(at_one, reference)
    chex.assert_trees_all_equal(metrics_one, metrics)
    at_zero, _ = stochastic(state, x, y, key, jnp.float32(0.0))
    chex.assert_trees_all_equal(at_zero, state)
    # the A/B is real: the plain step changes every stage
    for before, after in zip(state.stages, reference.stages, strict=True):
        assert not all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True
            )
        )


@pytest.mark.parametrize("name", ["bp", "dni"])
def test_realised_update_frequency_matches_p(setups, name):
    trainer, state, stochastic, _ = setups[name]
    p, steps = 0.6, 300
    keys = jax.random.split(jax.random.PRNGKey(11), steps)
    masks = np.asarray(jax.vmap(lambda k: trainer.stochastic_update_mask(k, p))(keys))
    frequency = masks.mean(axis=0)
    depth = len(trainer.stages)
    expected = (
        np.array([p ** (depth - k) for k in range(depth)]) if name == "bp" else np.full(depth, p)
    )
    sigma = np.sqrt(expected * (1 - expected) / steps)
    np.testing.assert_array_less(np.abs(frequency - expected), 4 * sigma + 1e-9)
    if name == "dni":  # independent per stage: not all equal
        assert len({tuple(m) for m in masks}) > 4
    # the state follows the mask: a stage changed exactly when its mask was set
    x, y = _batch(2)
    for k in keys[:12]:
        new, _ = stochastic(state, x, y, k, jnp.float32(p))
        mask = np.asarray(trainer.stochastic_update_mask(k, p))
        for stage, (before, after) in enumerate(zip(state.stages, new.stages, strict=True)):
            changed = not np.array_equal(
                jax.tree.leaves(before.params)[0], jax.tree.leaves(after.params)[0]
            )
            assert changed == bool(mask[stage])


def test_bp_lambda_one_is_backprop_and_zero_is_dni(setups):
    _, state, _, dni_plain = setups["dni"]
    _, bp_state, _, bp_plain = setups["bp"]
    x, y = _batch(3)
    dni_step, _ = dni_plain(state, x, y)
    lambdas = [_trainer(bp_lambda(value, SYNTH)) for value in (0.0, 1.0)]
    # Both BP(lambda) steps compiled as one program.
    bp0_step, bp1_step = jax.jit(lambda s, x, y: [t.step(s, x, y)[0] for t in lambdas])(state, x, y)
    chex.assert_trees_all_equal(bp0_step, dni_step)
    reference, _ = bp_plain(bp_state, x, y)  # the same stages (same key)
    chex.assert_trees_all_equal(bp_state.stages, state.stages)
    chex.assert_trees_all_close(bp1_step.stages, reference.stages, rtol=1e-5, atol=1e-6)
    # the A/B is real: with these synthesizers DNI's first stage moves differently from bp's
    diff = jax.tree.map(
        lambda a, b: jnp.max(jnp.abs(a - b)),
        dni_step.stages[0].params,
        reference.stages[0].params,
    )
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_complete_unlock_with_true_inputs_is_the_dni_step(setups):
    trainer, state, _, plain = setups["unlock"]
    x, y = _batch(4)
    cdni = _trainer(dni(SYNTH, conditioned=True))
    plain_state = state._replace(inputs=())
    # The unlocked trainer fed the chain's own outputs in place of its synthetic inputs.
    fed_true = copy.copy(trainer)
    fed_true.synthetic_inputs = lambda s, x: tuple(
        fwd.output for fwd in trainer.gradients(s, x, y).forwards
    )
    # Both steps compiled as one program.
    (reference, ref_metrics), (with_true, metrics) = jax.jit(
        lambda plain_state, state, x: (cdni.step(plain_state, x, y), fed_true.step(state, x, y))
    )(plain_state, state, x)
    chex.assert_trees_all_equal(with_true.stages, reference.stages)
    chex.assert_trees_all_equal(with_true.synthesizers, reference.synthesizers)
    chex.assert_trees_all_equal(metrics._replace(input_loss=()), ref_metrics)
    assert metrics.input_loss.shape == (len(state.inputs),)  # the input models' losses, reported
    # with the synthetic inputs the step differs above the first group, and the input models learn
    unlocked, _ = plain(state, x, y)
    chex.assert_trees_all_equal(unlocked.stages[0], reference.stages[0])
    assert not np.allclose(
        unlocked.stages[1].params["Dense_0"]["kernel"],
        reference.stages[1].params["Dense_0"]["kernel"],
    )

    @jax.jit
    def input_error(current):
        predicted = trainer.synthetic_inputs(current, x)
        first = current.stages[0]
        true = apply_module(trainer.stages[0], first.params, first.collections, x, train=True)[0]
        return jnp.mean(jnp.square(predicted[0] - true))

    # the reported loss is the first input model's: squared error summed over units, batch mean
    width = trainer.synthetic_inputs(state, x)[0].shape[-1]
    np.testing.assert_allclose(metrics.input_loss[0], input_error(state) * width, rtol=1e-5)

    losses = []
    current = state
    for _ in range(30):
        losses.append(float(input_error(current)))
        current, _ = plain(current, x, y)
    assert losses[-1] < 0.5 * losses[0]


def test_dgl_gradient_is_its_own_auxiliary_loss_alone():
    x, y = _batch(5)
    trainer = _trainer(dgl(), optax.sgd(1.0))
    state = jax.jit(trainer.init)(jax.random.PRNGKey(3), x)
    new, metrics = jax.jit(trainer.step)(state, x, y)
    h = x
    for k in range(len(trainer.stages) - 1):
        module, stage, head = trainer.stages[k], state.stages[k], state.synthesizers[k]

        def own_loss(p, h=h, module=module, stage=stage, head=head):
            out = apply_module(module, p, stage.collections, h, train=True)[0]
            aux = synthesizers.auto_auxiliary().build(out.shape[1:], 10)
            return cross_entropy(apply_module(aux, head.params, {}, out, train=True)[0], y)

        loss, grad = jax.value_and_grad(own_loss)(stage.params)
        moved = jax.tree.map(lambda a, b: a - b, stage.params, new.stages[k].params)
        chex.assert_trees_all_close(moved, grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics.sg_loss[k], loss, rtol=1e-6)
        h = apply_module(module, stage.params, stage.collections, h, train=True)[0]
    # nothing from above: changing the stages above stage 0 leaves stage 0's update unchanged
    above = state._replace(
        stages=(
            state.stages[0],
            *(
                s._replace(params=jax.tree.map(lambda a: 2 * a + 1, s.params))
                for s in state.stages[1:]
            ),
        )
    )
    other, _ = jax.jit(trainer.step)(above, x, y)
    chex.assert_trees_all_equal(other.stages[0], new.stages[0])


def test_baselines_zero_gradient_freezes_and_per_example_stale_gradient_averages():
    x, y = _batch(6)
    zero = _trainer(zero_gradient())
    state = jax.jit(zero.init)(jax.random.PRNGKey(4), x)
    new, _ = jax.jit(zero.step)(state, x, y)
    for k in range(2):
        chex.assert_trees_all_equal(new.stages[k].params, state.stages[k].params)
    assert not np.array_equal(
        new.stages[2].params["Dense_0"]["kernel"], state.stages[2].params["Dense_0"]["kernel"]
    )

    # The stale gradient is kept per training example: the first BATCH rows hold the examples
    # of x, the next BATCH the same images under other ids (never drawn yet).
    stale = _trainer(per_example_stale_gradient(2 * BATCH, 0.5))
    state = jax.jit(stale.init)(jax.random.PRNGKey(4), x)
    step = jax.jit(stale.step)
    ids, others = jnp.arange(BATCH), jnp.arange(BATCH, 2 * BATCH)
    first, _ = step(state, x, y, example_ids=ids)  # the averages start at 0: no update yet
    for k in range(2):
        chex.assert_trees_all_equal(first.stages[k].params, state.stages[k].params)
    true = jax.jit(stale.boundary_gradients)(state, x, y)
    for j in range(2):
        table = first.synthesizers[j].collections["stale"]
        chex.assert_trees_all_close(table[:BATCH], 0.5 * true[j], rtol=1e-4, atol=1e-8)
        assert not np.any(table[BATCH:]), "rows of examples not drawn stay zero"
    # Other examples: their rows are still zero, so the decoupled stages do not move (a
    # per-position average would move them).
    elsewhere, _ = step(first, x, y, example_ids=others)
    for k in range(2):
        chex.assert_trees_all_equal(elsewhere.stages[k].params, first.stages[k].params)
    second, _ = step(first, x, y, example_ids=ids)
    assert not np.array_equal(
        second.stages[0].params["Dense_0"]["kernel"], first.stages[0].params["Dense_0"]["kernel"]
    )
    with pytest.raises(ValueError, match="needs example_ids"):
        stale.step(state, x, y)


def test_stale_gradient_is_a_moving_average_over_steps_of_the_batch_mean():
    """The paper's baseline: every row of every batch gets the same average of past steps'
    batch-mean true dLoss/dh (other examples'), checked against numpy over four steps."""
    decay = 0.75
    stale = _trainer(stale_gradient(decay))
    state = jax.jit(stale.init)(jax.random.PRNGKey(4), _batch(6)[0])

    @jax.jit
    def one_step(state, x, y, sent):
        """Everything a step checks, compiled as one program."""
        got, sent_in = (
            stale.gradients(state, x, y, synthetic_override=o).groups for o in (None, sent)
        )
        return (
            [g.stages for g in got],
            [g.stages for g in sent_in],
            stale.step(state, x, y)[0],
            stale.boundary_gradients(state, x, y),
        )

    expected = [np.zeros(UNITS), np.zeros(UNITS)]
    for t in range(4):
        x, y = _batch(10 + t)  # new examples every step: the average is not theirs
        # What each group is updated with: the average so far, broadcast to every row.
        sent = [
            jnp.broadcast_to(s.collections["stale"], (BATCH, UNITS)) for s in state.synthesizers
        ]
        got, with_sent, new, true = one_step(state, x, y, sent)
        chex.assert_trees_all_close(got, with_sent, rtol=1e-5, atol=1e-9)
        moved = not np.array_equal(
            new.stages[1].params["Dense_0"]["kernel"], state.stages[1].params["Dense_0"]["kernel"]
        )
        assert moved == (t > 0), t  # a zero average at first: the group below the top stays
        expected = [
            decay * e + (1 - decay) * np.mean(g, axis=0)
            for e, g in zip(expected, true, strict=True)
        ]
        for j in range(2):
            stored = new.synthesizers[j].collections["stale"]
            assert stored.shape == (UNITS,), stored.shape
            np.testing.assert_allclose(stored, expected[j], rtol=1e-4, atol=1e-9)
        state = new
    # Into the output layer the batch mean is real; into Dense->BatchNorm it is zero up to
    # rounding (BatchNorm ignores a shift common to the batch): the paper's FCN has BatchNorm.
    assert np.abs(expected[1]).max() > 1e-4, expected[1]
    assert np.abs(expected[0]).max() < 1e-4 * np.abs(expected[1]).max(), expected[0]
    with pytest.raises(ValueError, match="must be in"):
        stale_gradient(1.0)

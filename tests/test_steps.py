"""The update steps: the oracle invariant, zero-initialised modules, module learning, compiling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgjax import steps
from sgjax.training.config import TrainConfig
from sgjax.schedules import make_optimizer


def _spec(hidden_layers: int, conditioned: bool = False, sg_hidden_layers: int = 1):
    return steps.NetworkSpec(
        input_dim=20,
        hidden_layers=hidden_layers,
        hidden_units=16,
        num_classes=10,
        sg_hidden_layers=sg_hidden_layers,
        sg_hidden_units=32,
        conditioned=conditioned,
    )


def _batch(seed: int = 1, size: int = 32, dim: int = 20):
    key_x, key_y = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.uniform(key_x, (size, dim)), jax.random.randint(key_y, (size,), 0, 10)


def _randomise_last_module_layers(state: steps.DecoupledState, key: jax.Array):
    """Give every module a non-zero output layer so synthetic gradients are not zero."""
    hidden = []
    for i, layer in enumerate(state.hidden):
        params = jax.tree_util.tree_map(lambda p: p, layer.module.params)
        last = max(k for k in params if k.startswith("Dense_"))
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        params[last] = {
            "kernel": 0.1 * jax.random.normal(k1, params[last]["kernel"].shape),
            "bias": 0.1 * jax.random.normal(k2, params[last]["bias"].shape),
        }
        hidden.append(layer._replace(module=layer.module._replace(params=params)))
    return state._replace(hidden=tuple(hidden))


def _assert_trees_close(a, b, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol),
        a,
        b,
    )


def _max_abs_difference(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize("hidden_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("conditioned", [False, True])
def test_oracle_synthetic_gradients_reproduce_backprop(hidden_layers: int, conditioned: bool):
    spec = _spec(hidden_layers, conditioned)
    optimizer = make_optimizer(optax.constant_schedule(1e-3))
    key = jax.random.PRNGKey(hidden_layers)
    bp_state = steps.init_backprop(key, spec, optimizer)
    sg_state = _randomise_last_module_layers(
        steps.init_decoupled(key, spec, optimizer), jax.random.PRNGKey(7)
    )
    images, labels = _batch()

    bp_grads, _, bp_loss, _ = steps.backprop_gradients(bp_state, images, labels)
    blocks, output = steps.network_of(sg_state)
    oracle = steps.activation_gradients(blocks, output, images, labels)
    sg = steps.decoupled_gradients(sg_state, images, labels, spec, synthetic_override=oracle)

    np.testing.assert_allclose(sg.loss, bp_loss, rtol=1e-6)
    for i in range(hidden_layers):
        _assert_trees_close(sg.hidden[i].block, bp_grads.blocks[i])
        # Bootstrapped targets carried back through the true gradient are the true gradient.
        np.testing.assert_allclose(sg.targets[i], oracle[i], atol=1e-6, rtol=1e-5)
    _assert_trees_close(sg.output, bp_grads.output)

    # The comparison has teeth: the modules' own (non-zero, untrained) synthetic gradients
    # give different block gradients, and the oracle gradients are not all zero.
    own = steps.decoupled_gradients(sg_state, images, labels, spec)
    assert _max_abs_difference(own.hidden[0].block, bp_grads.blocks[0]) > 1e-4
    assert max(float(jnp.max(jnp.abs(g))) for g in oracle) > 1e-4


def test_backprop_and_decoupled_start_from_the_same_network():
    spec = _spec(3)
    optimizer = make_optimizer(optax.constant_schedule(1e-3))
    key = jax.random.PRNGKey(3)
    bp = steps.init_backprop(key, spec, optimizer)
    sg = steps.init_decoupled(key, spec, optimizer)
    _assert_trees_close(bp.blocks, tuple(h.block for h in sg.hidden), atol=0, rtol=0)
    _assert_trees_close(bp.output, sg.output.params, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["sg", "cdni"])
def test_zero_initialised_modules_leave_blocks_untouched_at_first_step(mode: str):
    config = TrainConfig(mode=mode, hidden_layers=3, hidden_units=16, sg_hidden_units=32)
    spec = steps.NetworkSpec.from_config(config)._replace(input_dim=20)
    optimizer = make_optimizer(optax.constant_schedule(1e-3))
    state = steps.init_decoupled(jax.random.PRNGKey(0), spec, optimizer)
    images, labels = _batch()

    grads = steps.decoupled_gradients(state, images, labels, spec)
    for g, synthetic in zip(grads.hidden, grads.synthetic, strict=True):
        assert not np.any(np.asarray(synthetic))
        for leaf in jax.tree_util.tree_leaves(g.block):
            assert not np.any(np.asarray(leaf))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(grads.output)) > 0

    new_state, metrics = steps.decoupled_step(state, images, labels, spec, optimizer)
    for old, new in zip(state.hidden, new_state.hidden, strict=True):
        _assert_trees_close(old.block.params, new.block.params, atol=0, rtol=0)
    assert _max_abs_difference(state.output.params, new_state.output.params) > 0
    assert metrics.sg_loss.shape == (3,)


@pytest.mark.parametrize(("sg_hidden_layers", "conditioned"), [(0, True), (2, False)])
def test_synthetic_gradient_loss_falls_on_a_fixed_batch(sg_hidden_layers: int, conditioned: bool):
    """Train only module L towards the fixed true gradient t_L; its loss must fall far.

    (A linear module needs the label: t_L = W_out^T (softmax - onehot) is linear in it.)
    """
    spec = _spec(2, conditioned=conditioned, sg_hidden_layers=sg_hidden_layers)
    optimizer = make_optimizer(optax.constant_schedule(3e-3))
    state = steps.init_decoupled(jax.random.PRNGKey(0), spec, optimizer)
    images, labels = _batch(size=64)
    top = state.hidden[-1]

    @jax.jit
    def module_update(module: steps.LayerVars, opt_state: optax.OptState):
        grads = steps.decoupled_gradients(
            state._replace(hidden=state.hidden[:-1] + (top._replace(module=module),)),
            images,
            labels,
            spec,
        )
        last = grads.hidden[-1]
        updates, opt_state = optimizer.update(last.module, opt_state, module.params)
        params = optax.apply_updates(module.params, updates)
        return steps.LayerVars(params, grads.forwards[-1].module_stats), opt_state, last.sg_loss

    module, opt_state = top.module, top.module_opt
    losses = []
    for _ in range(300):
        module, opt_state, loss = module_update(module, opt_state)
        losses.append(float(loss))
    assert losses[0] > 0
    print(f"sg loss {losses[0]:.3g} -> {np.mean(losses[-10:]):.3g}")
    assert np.mean(losses[-10:]) < 0.2 * losses[0], (losses[0], losses[-10:])


def _count_traces(fn):
    counter = {"traces": 0}

    def wrapped(*args):
        counter["traces"] += 1
        return fn(*args)

    return wrapped, counter


@pytest.mark.parametrize("mode", ["bp", "sg", "cdni"])
def test_train_step_compiles_once(mode: str):
    config = TrainConfig(mode=mode, hidden_layers=2, hidden_units=16, sg_hidden_units=32)
    optimizer = make_optimizer(optax.constant_schedule(1e-3))
    spec = steps.NetworkSpec.from_config(config)
    state = steps.init_model(jax.random.PRNGKey(0), config, optimizer)
    step, counter = _count_traces(steps.make_train_step(config, optimizer))
    step = jax.jit(step)
    losses = []
    for seed in range(3):
        images, labels = _batch(seed, dim=spec.input_dim)
        state, metrics = step(state, images, labels)
        losses.append(float(metrics.loss))
    assert counter["traces"] == 1
    assert len(set(losses)) == 3

"""The public Trainer API on several chains: the oracle invariant, zero-initialised
synthesizers, vmap over seeds, and an independent reference for the synchronous DNI step."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from program_checks import assert_vmap_equals_separate_runs

from sgjax.core import synthesizers
from sgjax.core.layers import HiddenBlock, OutputLayer, accuracy, cross_entropy
from sgjax.core.methods import backprop, dni
from sgjax.core.optim import adam
from sgjax.core.trainer import Trainer
from sgjax.models.cnn import cnn_stages

BATCH, IN, UNITS, CLASSES = 16, 20, 12, 10


class LayerNormBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return nn.tanh(nn.LayerNorm()(nn.Dense(self.features)(x)))


class Residual(nn.Module):
    """A stateless stage: x + Dense(relu(x))."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return x + nn.Dense(x.shape[-1])(nn.relu(x))


CHAINS = {
    "mlp_batchnorm": lambda: [
        HiddenBlock(UNITS),
        HiddenBlock(UNITS),
        HiddenBlock(UNITS),
        OutputLayer(CLASSES),
    ],
    "layernorm": lambda: [LayerNormBlock(UNITS), LayerNormBlock(UNITS), OutputLayer(CLASSES)],
    "stateless_residual": lambda: [
        HiddenBlock(UNITS),
        Residual(),
        Residual(),
        OutputLayer(CLASSES),
    ],
    # The paper's CNN at depth 3 and 4 on 4x5 one-channel "images" (the 20 inputs reshaped).
    "cnn_depth3": lambda: cnn_stages(3, 4, kernel_size=3, input_shape=(4, 5, 1)),
    "cnn_depth4": lambda: cnn_stages(4, 4, kernel_size=3, input_shape=(4, 5, 1)),
}


def _synthesizer(chain: str) -> synthesizers.SynthesizerFactory:
    """Convolutional synthesizers (one hidden layer) for the CNNs, dense ones otherwise."""
    return synthesizers.conv(1, 4, 3) if chain.startswith("cnn") else synthesizers.dense(1, 8)


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (BATCH, IN)), jax.random.randint(ky, (BATCH,), 0, CLASSES)


def _trainer(stages, method) -> Trainer:
    return Trainer(stages, method, cross_entropy, adam(1e-2), accuracy=accuracy)


def _make_synthesizers_nonzero(state, key):
    """Random synthesizer parameters, so that synthetic and true gradients really differ."""
    leaves, tree = jax.tree_util.tree_flatten([s.params for s in state.synthesizers])
    keys = jax.random.split(key, len(leaves))
    noisy = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    params = jax.tree_util.tree_unflatten(tree, noisy)
    return state._replace(
        synthesizers=tuple(
            s._replace(params=p) for s, p in zip(state.synthesizers, params, strict=True)
        )
    )


def _stage_params(state):
    return [s.params for s in state.stages]


def _steps(trainers):
    """One step of each trainer from its own state, compiled as one program (one compile instead
    of one per trainer)."""
    return jax.jit(
        lambda states, x, y: [t.step(s, x, y) for t, s in zip(trainers, states, strict=True)]
    )


# Label conditioning changes only the synthesizers' inputs: checked on the MLP and on both CNNs
# (label channels), not on every chain, to keep the suite short. The CNN cases are the costliest
# (about 3-5 s each): marked slow, so the fast core (-m "not slow") checks the dense chains.
def _case(chain: str, conditioned: bool) -> Any:
    marks = (pytest.mark.slow,) if chain.startswith("cnn") else ()
    return pytest.param(chain, conditioned, marks=marks, id=f"{chain}-{conditioned}")


ORACLE_CASES = [_case(chain, False) for chain in sorted(CHAINS)] + [
    _case(chain, True) for chain in ("mlp_batchnorm", "cnn_depth3", "cnn_depth4")
]


@pytest.mark.parametrize(("chain", "conditioned"), ORACLE_CASES)
def test_oracle_step_equals_backprop_step(chain: str, conditioned: bool) -> None:
    x, y = _batch()
    key = jax.random.PRNGKey(1)
    bp = _trainer(CHAINS[chain](), backprop())
    synthesizer = _synthesizer(chain)
    oracle = _trainer(CHAINS[chain](), dni(synthesizer, conditioned=conditioned, oracle=True))
    sg = _trainer(CHAINS[chain](), dni(synthesizer, conditioned=conditioned))
    state_bp = bp.init(key, x)
    state_sg = _make_synthesizers_nonzero(oracle.init(key, x), jax.random.PRNGKey(2))
    # Same network for the same key whatever the method.
    chex.assert_trees_all_equal(_stage_params(state_bp), _stage_params(state_sg))

    (after_bp, m_bp), (after_oracle, m_or), (after_sg, _) = _steps((bp, oracle, sg))(
        (state_bp, state_sg, state_sg), x, y
    )
    chex.assert_trees_all_close(
        _stage_params(after_oracle), _stage_params(after_bp), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
        [s.collections for s in after_oracle.stages],
        [s.collections for s in after_bp.stages],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(m_or.loss, m_bp.loss, rtol=1e-6)
    # The A/B is real: the synthesizers' own (non-zero) gradients give another step.
    hidden_sg = jax.tree_util.tree_leaves(_stage_params(after_sg)[:-1])
    hidden_bp = jax.tree_util.tree_leaves(_stage_params(after_bp)[:-1])
    assert (
        max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(hidden_sg, hidden_bp, strict=True))
        > 1e-4
    )


def test_oracle_with_two_stages_coupled() -> None:
    """Boundaries after stages 0 and 2 of five: stages 1-2 and 3-4 are coupled groups."""
    x, y = _batch(3)

    def chain() -> list[nn.Module]:
        return [
            HiddenBlock(UNITS),
            HiddenBlock(UNITS),
            LayerNormBlock(UNITS),
            Residual(),
            OutputLayer(CLASSES),
        ]

    bp = _trainer(chain(), backprop())
    oracle = _trainer(chain(), dni(synthesizers.dense(0), boundaries=(0, 2), oracle=True))
    assert oracle.groups == ((0,), (1, 2), (3, 4))
    key = jax.random.PRNGKey(4)
    state = _make_synthesizers_nonzero(oracle.init(key, x), jax.random.PRNGKey(5))
    assert len(state.synthesizers) == 2
    (after_bp, _), (after_oracle, _) = _steps((bp, oracle))((bp.init(key, x), state), x, y)
    chex.assert_trees_all_close(
        _stage_params(after_oracle), _stage_params(after_bp), rtol=1e-5, atol=1e-6
    )


def test_bootstrapped_targets_are_true_gradients_under_the_oracle() -> None:
    x, y = _batch(6)
    trainer = _trainer(CHAINS["mlp_batchnorm"](), dni(synthesizers.dense(0)))
    state = _make_synthesizers_nonzero(
        trainer.init(jax.random.PRNGKey(0), x), jax.random.PRNGKey(7)
    )

    @jax.jit  # the three computations as one program (faster than op by op)
    def targets_of(state):
        true = trainer.boundary_gradients(state, x, y)
        return (
            true,
            trainer.gradients(state, x, y, synthetic_override=true)[3],
            trainer.gradients(state, x, y)[3],
        )

    true, targets, own = targets_of(state)
    chex.assert_trees_all_close(list(targets), list(true), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(own[0] - true[0]))) > 1e-4


@pytest.mark.parametrize("chain", ["layernorm", pytest.param("cnn_depth4", marks=pytest.mark.slow)])
@pytest.mark.parametrize("conditioned", [False, True])
def test_zero_initialised_synthesizers_leave_decoupled_stages_unchanged(
    chain: str, conditioned: bool
) -> None:
    x, y = _batch(8)
    trainer = _trainer(CHAINS[chain](), dni(_synthesizer(chain), conditioned=conditioned))
    state = trainer.init(jax.random.PRNGKey(0), x)
    # The gradients and the step as one program (faster than op by op).
    (forwards, grads, last, _), (after, _) = jax.jit(
        lambda s: (trainer.gradients(s, x, y), trainer.step(s, x, y))
    )(state)
    for fwd, g in zip(forwards, grads, strict=True):
        assert float(jnp.max(jnp.abs(fwd.synthetic_grad))) == 0.0
        for leaf in jax.tree_util.tree_leaves(g.stages):
            assert float(jnp.max(jnp.abs(leaf))) == 0.0
    # The last stage does learn from the true loss gradient.
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree_util.tree_leaves(last.stages)) > 0
    chex.assert_trees_all_equal(_stage_params(after)[:-1], _stage_params(state)[:-1])


def _independent_dni_step(stages, state, x, y, lr):
    """DNI written out by hand for a chain of one-stage groups (no Trainer code), one Adam step."""
    from sgjax.core.layers import apply_module

    hs, vjps = [x], []
    new_colls = []
    for k, (module, s) in enumerate(zip(stages[:-1], state.stages[:-1], strict=True)):
        out, vjp, c = jax.vjp(
            lambda p, h, m=module, s=s: apply_module(m, p, s.collections, h, train=True),
            s.params,
            hs[-1],
            has_aux=True,
        )
        hs.append(out)
        vjps.append(vjp)
        new_colls.append(c)
        del k
    synth_out, synth_fns = [], []
    for h, sy in zip(hs[1:], state.synthesizers, strict=True):
        module = synthesizers.dense(1, 8).build(h.shape[1:])

        def g_of(p, h=h, sy=sy, module=module):
            return apply_module(module, p, sy.collections, h, None, train=True)[0]

        synth_out.append(g_of(sy.params))
        synth_fns.append(g_of)
    last = state.stages[-1]

    def loss_of(p, h):
        return cross_entropy(stages[-1].apply({"params": p}, h), y)

    last_grad, target = jax.grad(loss_of, argnums=(0, 1))(last.params, hs[-1])
    grads, synth_grads = [None] * len(vjps), [None] * len(vjps)
    for i in reversed(range(len(vjps))):
        grads[i], input_grad = vjps[i](synth_out[i])
        synth_grads[i] = jax.grad(
            lambda p, i=i, t=target: jnp.sum((synth_fns[i](p) - t) ** 2) / x.shape[0]
        )(state.synthesizers[i].params)
        target = input_grad

    def sgd(params, g):
        return jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g)

    new_params = [sgd(s.params, g) for s, g in zip(state.stages, [*grads, last_grad], strict=True)]
    new_synth = [sgd(s.params, g) for s, g in zip(state.synthesizers, synth_grads, strict=True)]
    return new_params, new_synth


def test_dni_step_equals_an_independent_reference() -> None:
    x, y = _batch(9)
    stages = CHAINS["mlp_batchnorm"]()
    # Plain SGD: Adam would amplify rounding noise in gradients that are 0 in exact arithmetic
    # (the Dense biases before BatchNorm), which says nothing about the plumbing.
    trainer = Trainer(stages, dni(synthesizers.dense(1, 8)), cross_entropy, optax.sgd(0.5))
    state = _make_synthesizers_nonzero(
        trainer.init(jax.random.PRNGKey(3), x), jax.random.PRNGKey(4)
    )
    after, _ = jax.jit(trainer.step)(state, x, y)
    ref_params, ref_synth = _independent_dni_step(stages, state, x, y, 0.5)
    chex.assert_trees_all_close(_stage_params(after), ref_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        [s.params for s in after.synthesizers], ref_synth, rtol=1e-5, atol=1e-6
    )


def test_vmap_over_seeds_equals_separate_runs() -> None:
    x, y = _batch(10)
    # LayerNorm, not BatchNorm: a Dense bias before BatchNorm has a true gradient of 0, and Adam
    # turns the rounding noise of a batched matmul into a full-size step there.
    trainer = _trainer(CHAINS["layernorm"](), dni(synthesizers.dense(0), conditioned=True))

    def run(seed: jax.Array) -> jax.Array:
        state = trainer.init(jax.random.PRNGKey(seed), x)
        for _ in range(3):
            state, metrics = trainer.step(state, x, y)
        return metrics.loss, state

    assert_vmap_equals_separate_runs(run)


def test_bad_boundaries_are_refused() -> None:
    with pytest.raises(ValueError, match="boundary 3"):
        _trainer(CHAINS["layernorm"](), dni(boundaries=(3,)))
    with pytest.raises(ValueError, match="increasing"):
        dni(boundaries=(1, 0))


def test_label_channels_of_conditioned_conv_synthesizers() -> None:
    """cDNI for maps: 10 extra input channels, all zero except the label's, all ones."""
    module = synthesizers.conv(0, 4, 3).build((4, 5, 3))
    h = jnp.zeros((2, 4, 5, 3))
    context = jax.nn.one_hot(jnp.array([1, 7]), CLASSES)
    variables = module.init(jax.random.PRNGKey(0), h, context, train=False)
    assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 3 + CLASSES, 3)
    # Give only label 7's input channel a weight: the output is non-zero for example 1 alone.
    kernel = jnp.zeros((3, 3, 3 + CLASSES, 3)).at[1, 1, 3 + 7, 0].set(1.0)
    out = module.apply(
        {"params": {"Conv_0": {"kernel": kernel, "bias": jnp.zeros(3)}}},
        h,
        context,
        train=False,
    )
    np.testing.assert_array_equal(np.asarray(out[1, :, :, 0]), np.ones((4, 5)))
    assert float(jnp.abs(out[0]).max()) == 0.0


def test_same_conv_gradients_equal_xla_gradients() -> None:
    """The loop-friendly convolution's custom gradients are the convolution's true gradients."""
    from sgjax.core.conv import _conv, same_conv

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 6, 4))
    kernels = [jax.random.normal(jax.random.PRNGKey(k), (k, k, 4, 5)) for k in (3, 4, 5)]

    def loss(conv, x, k):
        return jnp.sum(jnp.sin(conv(x, k)))

    @jax.jit  # every size's gradients and outputs, ours and XLA's, as one program
    def both(x, kernels):
        return [
            [jax.grad(lambda x, k, c=c: loss(c, x, k), argnums=(0, 1))(x, k), c(x, k)]
            for k in kernels
            for c in (same_conv, _conv)
        ]

    results = both(x, kernels)
    for (ours, ours_out), (xla, xla_out) in zip(results[::2], results[1::2], strict=True):
        chex.assert_trees_all_close(ours, xla, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours_out, xla_out, rtol=1e-6)


def test_synthetic_gradient_cosines_rise_when_synthesizers_learn() -> None:
    """Stages frozen, one fixed batch: linear synthesizers fit their targets (measured cosines
    0.83 and 0.90 after 300 Adam steps at 1e-3); with a zero synthesizer update they stay 0."""
    x, y = _batch(11)

    def cosines_after(synthesizer_optimizer: optax.GradientTransformation) -> np.ndarray:
        trainer = Trainer(
            CHAINS["layernorm"](),
            dni(synthesizers.dense(0)),
            cross_entropy,
            optax.sgd(0.0),
            synthesizer_optimizer=synthesizer_optimizer,
        )
        state = trainer.init(jax.random.PRNGKey(2), x)
        assert np.all(np.asarray(trainer.synthetic_gradient_cosines(state, x, y)) == 0.0)
        step = jax.jit(trainer.step)
        for _ in range(300):
            state, _ = step(state, x, y)
        return np.asarray(trainer.synthetic_gradient_cosines(state, x, y))

    assert np.all(cosines_after(optax.adam(1e-3)) > 0.6)
    assert np.all(cosines_after(optax.set_to_zero()) == 0.0)

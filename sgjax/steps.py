"""Pure update steps: backprop over the whole network, and decoupled (synthetic-gradient) updates.

Notation (DESIGN.md): h_0 = x, h_i = f_i(theta_i, h_{i-1}) for hidden blocks i = 1..L,
logits = f_{L+1}(h_L). In the decoupled step every hidden block i has a module M_i with
g_i = M_i(h_i) ~ dLoss/dh_i, and

* block i is updated with the VJP of f_i at (theta_i, h_{i-1}) with g_i; h_{i-1} is a constant;
* the output layer is updated with the true gradient of the loss;
* M_i regresses g_i onto a constant target t_i: t_L = dLoss/dh_L, and for i < L
  t_i = VJP of f_{i+1} at h_i with g_{i+1} (bootstrapping);
* M_i's loss is mean over the batch of ||g_i - t_i||^2 (sum over units).

Each layer's work is a pure function of that layer's state and the messages it receives
(``hidden_forward``, ``hidden_backward``, ``output_backward``); ``decoupled_step`` composes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax.config import INPUT_DIM, NUM_CLASSES, TrainConfig
from sgjax.layers import accuracy, apply_block, apply_output, cross_entropy, init_block, init_output
from sgjax.synthetic import SyntheticGradient, apply_module, init_module


class LayerVars(NamedTuple):
    """A layer's trainable parameters and BatchNorm statistics."""

    params: Any
    batch_stats: Any


class NetworkSpec(NamedTuple):
    """Shapes of the network and of its synthetic-gradient modules."""

    input_dim: int
    hidden_layers: int
    hidden_units: int
    num_classes: int
    sg_hidden_layers: int
    sg_hidden_units: int
    conditioned: bool

    @classmethod
    def from_config(cls, config: TrainConfig) -> NetworkSpec:
        return cls(
            input_dim=INPUT_DIM,
            hidden_layers=config.hidden_layers,
            hidden_units=config.hidden_units,
            num_classes=NUM_CLASSES,
            sg_hidden_layers=config.resolved_sg_hidden_layers,
            sg_hidden_units=config.sg_hidden_units,
            conditioned=config.conditioned,
        )

    def module(self) -> SyntheticGradient:
        """The (stateless) Flax definition shared by every synthetic-gradient module."""
        return SyntheticGradient(
            out_features=self.hidden_units,
            hidden_layers=self.sg_hidden_layers,
            hidden_units=self.sg_hidden_units,
            num_classes=self.num_classes,
            conditioned=self.conditioned,
        )


class StepMetrics(NamedTuple):
    """Per-step training metrics; ``sg_loss`` has one entry per hidden block (none for bp)."""

    loss: jax.Array
    accuracy: jax.Array
    sg_loss: jax.Array


# --------------------------------------------------------------------------- initialisation


def init_network(key: jax.Array, spec: NetworkSpec) -> tuple[tuple[LayerVars, ...], Any]:
    """Hidden blocks' variables and the output layer's parameters."""
    keys = jax.random.split(key, spec.hidden_layers + 1)
    blocks = []
    in_features = spec.input_dim
    for i in range(spec.hidden_layers):
        variables = init_block(keys[i], in_features, spec.hidden_units)
        blocks.append(LayerVars(variables["params"], variables["batch_stats"]))
        in_features = spec.hidden_units
    output = init_output(keys[-1], in_features, spec.num_classes)["params"]
    return tuple(blocks), output


def forward(
    blocks: Sequence[LayerVars], output_params: Any, images: jax.Array, train: bool
) -> tuple[jax.Array, tuple[Any, ...]]:
    """Logits of the whole network and the blocks' (updated, if training) batch statistics."""
    h = images
    stats = []
    for block in blocks:
        h, new_stats = apply_block(block.params, block.batch_stats, h, train)
        stats.append(new_stats)
    return apply_output(output_params, h), tuple(stats)


def evaluate(
    blocks: Sequence[LayerVars], output_params: Any, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Loss and accuracy with BatchNorm running averages (evaluation mode)."""
    logits, _ = forward(blocks, output_params, images, train=False)
    return cross_entropy(logits, labels), accuracy(logits, labels)


# --------------------------------------------------------------------------- backprop


class BackpropParams(NamedTuple):
    blocks: tuple[Any, ...]
    output: Any


class BackpropState(NamedTuple):
    """The whole network under one Adam (Adam is elementwise, so one state equals per-layer)."""

    blocks: tuple[LayerVars, ...]
    output: Any
    opt_state: optax.OptState


def init_backprop(
    key: jax.Array, spec: NetworkSpec, optimizer: optax.GradientTransformation
) -> BackpropState:
    blocks, output = init_network(key, spec)
    params = BackpropParams(tuple(b.params for b in blocks), output)
    return BackpropState(blocks, output, optimizer.init(params))


def backprop_gradients(
    state: BackpropState, images: jax.Array, labels: jax.Array
) -> tuple[BackpropParams, tuple[Any, ...], jax.Array, jax.Array]:
    """True gradients of the loss for every layer; also new batch stats, loss and logits."""

    def loss_fn(params: BackpropParams) -> tuple[jax.Array, tuple[jax.Array, tuple[Any, ...]]]:
        blocks = [
            LayerVars(p, b.batch_stats) for p, b in zip(params.blocks, state.blocks, strict=True)
        ]
        logits, stats = forward(blocks, params.output, images, train=True)
        return cross_entropy(logits, labels), (logits, stats)

    params = BackpropParams(tuple(b.params for b in state.blocks), state.output)
    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, stats, loss, logits


def backprop_step(
    state: BackpropState,
    images: jax.Array,
    labels: jax.Array,
    optimizer: optax.GradientTransformation,
) -> tuple[BackpropState, StepMetrics]:
    """One step of ordinary backpropagation through all layers."""
    grads, stats, loss, logits = backprop_gradients(state, images, labels)
    params = BackpropParams(tuple(b.params for b in state.blocks), state.output)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    blocks = tuple(LayerVars(p, s) for p, s in zip(params.blocks, stats, strict=True))
    metrics = StepMetrics(loss, accuracy(logits, labels), jnp.zeros((0,), loss.dtype))
    return BackpropState(blocks, params.output, opt_state), metrics


def activation_gradients(
    blocks: Sequence[LayerVars], output_params: Any, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, ...]:
    """True dLoss/dh_i for every hidden block (training mode): the oracle for tests and probes."""

    def loss_of_offsets(offsets: Sequence[jax.Array]) -> jax.Array:
        h = images
        for block, offset in zip(blocks, offsets, strict=True):
            h, _ = apply_block(block.params, block.batch_stats, h, train=True)
            h = h + offset
        return cross_entropy(apply_output(output_params, h), labels)

    batch = images.shape[0]
    zeros = [
        jnp.zeros((batch, b.params["Dense_0"]["bias"].shape[-1]), images.dtype) for b in blocks
    ]
    return tuple(jax.grad(loss_of_offsets)(zeros))


# --------------------------------------------------------------------------- decoupled


class HiddenLayerState(NamedTuple):
    """Hidden block i with its synthetic-gradient module, each with its own Adam state."""

    block: LayerVars
    module: LayerVars
    block_opt: optax.OptState
    module_opt: optax.OptState


class OutputLayerState(NamedTuple):
    params: Any
    opt_state: optax.OptState


class DecoupledState(NamedTuple):
    hidden: tuple[HiddenLayerState, ...]
    output: OutputLayerState


def init_decoupled(
    key: jax.Array, spec: NetworkSpec, optimizer: optax.GradientTransformation
) -> DecoupledState:
    """Same network initialisation as ``init_backprop`` for the same key, plus the modules."""
    blocks, output = init_network(key, spec)
    module_keys = jax.random.split(jax.random.fold_in(key, 1), spec.hidden_layers)
    module_def = spec.module()
    hidden = []
    for block, k in zip(blocks, module_keys, strict=True):
        m = init_module(k, module_def)
        module = LayerVars(m["params"], m["batch_stats"])
        hidden.append(
            HiddenLayerState(
                block, module, optimizer.init(block.params), optimizer.init(module.params)
            )
        )
    return DecoupledState(tuple(hidden), OutputLayerState(output, optimizer.init(output)))


class HiddenForward(NamedTuple):
    """What block i's forward pass leaves for its backward pass.

    The VJP closures are ``jax.tree_util.Partial`` pytrees, so they can cross a jit boundary.
    """

    output: jax.Array
    synthetic_grad: jax.Array
    block_vjp: Callable
    module_vjp: Callable
    block_stats: Any
    module_stats: Any


class HiddenGradients(NamedTuple):
    block: Any
    module: Any
    input_grad: jax.Array
    """VJP of f_i at h_{i-1} with g_i: the bootstrapped target t_{i-1} for module i-1."""
    sg_loss: jax.Array


def hidden_forward(
    layer: HiddenLayerState, h_in: jax.Array, labels: jax.Array, spec: NetworkSpec
) -> HiddenForward:
    """Block i's output h_i and its synthetic gradient g_i = M_i(h_i), with their VJPs."""
    h_out, block_vjp, block_stats = jax.vjp(
        lambda p, x: apply_block(p, layer.block.batch_stats, x, train=True),
        layer.block.params,
        h_in,
        has_aux=True,
    )
    # M_i's input is a constant for M_i: its loss must not reach block i.
    h_const = jax.lax.stop_gradient(h_out)
    synthetic, module_vjp, module_stats = jax.vjp(
        lambda p: apply_module(spec.module(), p, layer.module.batch_stats, h_const, labels, True),
        layer.module.params,
        has_aux=True,
    )
    return HiddenForward(h_out, synthetic, block_vjp, module_vjp, block_stats, module_stats)


def hidden_backward(
    fwd: HiddenForward, target: jax.Array, synthetic_grad: jax.Array | None = None
) -> HiddenGradients:
    """Gradients of block i (from g_i) and of M_i (towards the constant target t_i).

    ``synthetic_grad`` replaces g_i for the block's update when given (the oracle test).
    """
    g = fwd.synthetic_grad if synthetic_grad is None else synthetic_grad
    g = jax.lax.stop_gradient(g)
    block_grads, input_grad = fwd.block_vjp(g)
    error = fwd.synthetic_grad - jax.lax.stop_gradient(target)
    batch = error.shape[0]
    sg_loss = jnp.sum(jnp.square(error)) / batch
    (module_grads,) = fwd.module_vjp(2.0 * error / batch)
    return HiddenGradients(block_grads, module_grads, input_grad, sg_loss)


def output_backward(
    params: Any, h_last: jax.Array, labels: jax.Array
) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """Output layer: true parameter gradient, dLoss/dh_L (target t_L), loss and logits."""

    def loss_fn(p: Any, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = apply_output(p, h)
        return cross_entropy(logits, labels), logits

    (loss, logits), (grads, h_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, h_last
    )
    return grads, h_grad, loss, logits


class DecoupledGradients(NamedTuple):
    """Every layer's and module's gradient from one decoupled step, and what produced them."""

    hidden: tuple[HiddenGradients, ...]
    output: Any
    targets: tuple[jax.Array, ...]
    synthetic: tuple[jax.Array, ...]
    forwards: tuple[HiddenForward, ...]
    loss: jax.Array
    logits: jax.Array


def decoupled_gradients(
    state: DecoupledState,
    images: jax.Array,
    labels: jax.Array,
    spec: NetworkSpec,
    synthetic_override: Sequence[jax.Array] | None = None,
) -> DecoupledGradients:
    """One synchronous decoupled pass over a minibatch, layer by layer.

    ``synthetic_override`` replaces every g_i (for blocks and for bootstrapped targets); with the
    true dLoss/dh_i it must reproduce backprop's gradients exactly.
    """
    forwards = []
    h = images
    for layer in state.hidden:
        fwd = hidden_forward(layer, h, labels, spec)
        forwards.append(fwd)
        h = fwd.output
    output_grads, target, loss, logits = output_backward(state.output.params, h, labels)

    num_hidden = len(forwards)
    hidden: list[HiddenGradients] = [None] * num_hidden  # type: ignore[list-item]
    targets: list[jax.Array] = [None] * num_hidden  # type: ignore[list-item]
    for i in reversed(range(num_hidden)):
        override = None if synthetic_override is None else synthetic_override[i]
        targets[i] = target
        hidden[i] = hidden_backward(forwards[i], target, override)
        target = hidden[i].input_grad
    synthetic = tuple(
        f.synthetic_grad if synthetic_override is None else synthetic_override[i]
        for i, f in enumerate(forwards)
    )
    return DecoupledGradients(
        tuple(hidden), output_grads, tuple(targets), synthetic, tuple(forwards), loss, logits
    )


def adam_update(
    optimizer: optax.GradientTransformation, grads: Any, opt_state: optax.OptState, params: Any
) -> tuple[Any, optax.OptState]:
    """One optimizer step on ``params``: the new parameters and optimizer state."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def update_hidden_layer(
    layer: HiddenLayerState,
    fwd: HiddenForward,
    grads: HiddenGradients,
    optimizer: optax.GradientTransformation,
) -> HiddenLayerState:
    """Apply block i's and module i's own Adam updates."""
    block_params, block_opt = adam_update(
        optimizer, grads.block, layer.block_opt, layer.block.params
    )
    module_params, module_opt = adam_update(
        optimizer, grads.module, layer.module_opt, layer.module.params
    )
    return HiddenLayerState(
        LayerVars(block_params, fwd.block_stats),
        LayerVars(module_params, fwd.module_stats),
        block_opt,
        module_opt,
    )


def decoupled_step(
    state: DecoupledState,
    images: jax.Array,
    labels: jax.Array,
    spec: NetworkSpec,
    optimizer: optax.GradientTransformation,
) -> tuple[DecoupledState, StepMetrics]:
    """One synchronous DNI/cDNI step: every layer and module updated with its own Adam."""
    grads = decoupled_gradients(state, images, labels, spec)
    hidden = tuple(
        update_hidden_layer(layer, fwd, g, optimizer)
        for layer, fwd, g in zip(state.hidden, grads.forwards, grads.hidden, strict=True)
    )
    output_params, output_opt = adam_update(
        optimizer, grads.output, state.output.opt_state, state.output.params
    )
    sg_loss = jnp.stack([g.sg_loss for g in grads.hidden])
    metrics = StepMetrics(grads.loss, accuracy(grads.logits, labels), sg_loss)
    return DecoupledState(hidden, OutputLayerState(output_params, output_opt)), metrics


# --------------------------------------------------------------------------- dispatch

ModelState = BackpropState | DecoupledState


def init_model(
    key: jax.Array, config: TrainConfig, optimizer: optax.GradientTransformation
) -> ModelState:
    """Initial state of the mode's model (same network weights for bp and sg with one key)."""
    spec = NetworkSpec.from_config(config)
    if config.decoupled:
        return init_decoupled(key, spec, optimizer)
    return init_backprop(key, spec, optimizer)


def make_train_step(
    config: TrainConfig, optimizer: optax.GradientTransformation
) -> Callable[[ModelState, jax.Array, jax.Array], tuple[ModelState, StepMetrics]]:
    """The mode's pure train step ``(state, images, labels) -> (state, metrics)``."""
    spec = NetworkSpec.from_config(config)
    if config.decoupled:
        return lambda s, x, y: decoupled_step(s, x, y, spec, optimizer)
    return lambda s, x, y: backprop_step(s, x, y, optimizer)


def network_of(state: ModelState) -> tuple[tuple[LayerVars, ...], Any]:
    """The hidden blocks' variables and the output parameters, whatever the mode."""
    if isinstance(state, DecoupledState):
        return tuple(h.block for h in state.hidden), state.output.params
    return state.blocks, state.output

"""Backprop baselines on the layer-parallel devices: model parallelism and GPipe.

Each stage (hidden block, or the output layer) lives on its device with its share of the Adam
state: Adam is elementwise, so per-stage states are the single-device state split by layer (its
``mu`` and ``nu``; the step counts are equal) and updates are identical.

A minibatch of B examples is split into M microbatches of B/M (M = 1: plain model parallelism,
"forward, then backward"). GPipe order: every microbatch goes forward through the stages, the
output stage computing its loss gradient as each arrives; then every microbatch goes backward;
each stage sums its parameter gradients over the microbatches and makes one Adam update with their
mean. Activations move forward and cotangents backward device to device. The backward pass uses
the VJP residuals kept by the forward pass (no recomputation).

BatchNorm normalises each microbatch with that microbatch's statistics, so for M > 1 this is not
the single-device step on the whole minibatch; it equals ``accumulated_backprop_step``, which does
the same on one device. Running averages are updated once per microbatch, in microbatch order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from sgjax.data.device import DeviceData, sample_batch
from sgjax.layers import accuracy, apply_block
from sgjax.parallel.stages import (
    Activations,
    BatchCursor,
    DispatchWindow,
    StageCompiler,
    WindowMetrics,
    abstract_on,
    device_id_of,
    time_chain,
    zeros_on,
)
from sgjax.steps import (
    BackpropParams,
    BackpropState,
    LayerVars,
    OutputLayerState,
    StepMetrics,
    adam_update,
    backprop_gradients,
    output_backward,
)
from sgjax.training.config import TrainConfig

# --------------------------------------------------------------------------- reference


def accumulated_backprop_step(
    state: BackpropState,
    images: jax.Array,
    labels: jax.Array,
    optimizer: optax.GradientTransformation,
    microbatches: int,
) -> tuple[BackpropState, StepMetrics]:
    """Single-device backprop with gradients accumulated over ``microbatches`` equal slices.

    Slice m is ``images[m * B/M : (m + 1) * B/M]``; BatchNorm sees one slice at a time and its
    running averages are updated slice by slice; the update uses the mean of the slices' gradients.
    With one microbatch this is ``steps.backprop_step``.
    """
    size = images.shape[0] // microbatches
    blocks = state.blocks
    total = None
    losses, accuracies = [], []
    for m in range(microbatches):
        x, y = images[m * size : (m + 1) * size], labels[m * size : (m + 1) * size]
        grads, stats, loss, logits = backprop_gradients(state._replace(blocks=blocks), x, y)
        blocks = tuple(LayerVars(b.params, s) for b, s in zip(blocks, stats, strict=True))
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
        losses.append(loss)
        accuracies.append(accuracy(logits, y))
    mean = jax.tree_util.tree_map(lambda g: g / microbatches, total)
    params = BackpropParams(tuple(b.params for b in state.blocks), state.output)
    params, opt_state = adam_update(optimizer, mean, state.opt_state, params)
    blocks = tuple(LayerVars(p, b.batch_stats) for p, b in zip(params.blocks, blocks, strict=True))
    loss = jnp.mean(jnp.stack(losses))
    metrics = StepMetrics(loss, jnp.mean(jnp.stack(accuracies)), jnp.zeros((0,), loss.dtype))
    return BackpropState(blocks, params.output, opt_state), metrics


# --------------------------------------------------------------------------- Adam state by stage


def stage_optimizer_state(
    opt_state: optax.OptState, select: Callable[[BackpropParams], Any]
) -> optax.OptState:
    """One stage's share of the whole network's Adam state (its part of ``mu`` and ``nu``)."""
    return otu.tree_set(
        opt_state,
        mu=select(otu.tree_get(opt_state, "mu")),
        nu=select(otu.tree_get(opt_state, "nu")),
    )


def merge_optimizer_states(stage_states: Sequence[optax.OptState]) -> optax.OptState:
    """The whole network's Adam state from the stages' states (hidden blocks, then output)."""

    def whole(name: str) -> BackpropParams:
        parts = [otu.tree_get(s, name) for s in stage_states]
        return BackpropParams(tuple(parts[:-1]), parts[-1])

    return otu.tree_set(stage_states[0], mu=whole("mu"), nu=whole("nu"))


# --------------------------------------------------------------------------- stage functions


class BlockStage(NamedTuple):
    """A hidden block under backprop, with its share of the Adam state."""

    block: LayerVars
    opt_state: optax.OptState


class BlockForward(NamedTuple):
    output: jax.Array
    vjp: Callable
    """VJP of the block at (params, input): cotangent -> (param grads, input grad); a pytree."""
    batch_stats: Any


class BlockBackward(NamedTuple):
    grads: Any
    """Parameter gradients summed over the microbatches so far."""
    input_grad: jax.Array | None


class OutputMicrobatch(NamedTuple):
    grads: Any
    """Parameter gradients summed over the microbatches so far."""
    input_grad: jax.Array
    loss: jax.Array
    accuracy: jax.Array


class Updated(NamedTuple):
    params: Any
    opt_state: optax.OptState


class Microbatches(NamedTuple):
    batches: tuple[Activations, ...]
    cursor: BatchCursor


def sample_microbatches(
    data: DeviceData, cursor: BatchCursor, *, batch_size: int, microbatches: int
) -> Microbatches:
    """Draw minibatch ``cursor.index`` (as the single-device loop does) and slice it."""
    batch = sample_batch(jax.random.fold_in(cursor.key, cursor.index), data, batch_size)
    size = batch_size // microbatches
    slices = tuple(
        Activations(
            batch.images[m * size : (m + 1) * size], batch.labels[m * size : (m + 1) * size]
        )
        for m in range(microbatches)
    )
    return Microbatches(slices, cursor._replace(index=cursor.index + 1))


def block_forward(block: LayerVars, h: jax.Array) -> BlockForward:
    """A block's training-mode output, its VJP and its updated batch statistics."""
    output, vjp, stats = jax.vjp(
        lambda p, x: apply_block(p, block.batch_stats, x, True), block.params, h, has_aux=True
    )
    return BlockForward(output, vjp, stats)


def block_backward(
    vjp: Callable, cotangent: jax.Array, accumulated: Any | None, *, send: bool = True
) -> BlockBackward:
    """Parameter gradients (added to ``accumulated``) and, if ``send``, the input's cotangent."""
    grads, input_grad = vjp(cotangent)
    if accumulated is not None:
        grads = jax.tree_util.tree_map(jnp.add, accumulated, grads)
    return BlockBackward(grads, input_grad if send else None)


def output_microbatch(
    params: Any, inputs: Activations, accumulated: Any | None
) -> OutputMicrobatch:
    """The output layer's gradients on one microbatch (added to ``accumulated``), dLoss/dh_L."""
    grads, h_grad, loss, logits = output_backward(params, inputs.h, inputs.labels)
    if accumulated is not None:
        grads = jax.tree_util.tree_map(jnp.add, accumulated, grads)
    return OutputMicrobatch(grads, h_grad, loss, accuracy(logits, inputs.labels))


def apply_mean_gradients(
    params: Any,
    opt_state: optax.OptState,
    grad_sum: Any,
    *,
    optimizer: optax.GradientTransformation,
    microbatches: int,
) -> Updated:
    """One Adam update with the mean of the microbatches' gradients."""
    mean = jax.tree_util.tree_map(lambda g: g / microbatches, grad_sum)
    return Updated(*adam_update(optimizer, mean, opt_state, params))


class BlockCalls(NamedTuple):
    forward: jax.stages.Compiled
    backward: jax.stages.Compiled
    """First microbatch: nothing accumulated yet."""
    backward_add: jax.stages.Compiled
    update: jax.stages.Compiled


class OutputCalls(NamedTuple):
    microbatch: jax.stages.Compiled
    microbatch_add: jax.stages.Compiled
    update: jax.stages.Compiled


class BackpropPipeline:
    """Model-parallel backprop (``microbatches=1``) or GPipe over ``devices``; an Engine."""

    def __init__(
        self,
        config: TrainConfig,
        data: DeviceData,
        devices: tuple[jax.Device, ...],
        model: BackpropState,
        key: jax.Array,
        optimizer: optax.GradientTransformation,
        microbatches: int = 1,
        max_minibatches_in_flight: int = 4,
    ) -> None:
        self.config = config
        self.data = data
        self.devices = devices
        self.optimizer = optimizer
        self.microbatches = microbatches
        self.stages = [
            jax.device_put(
                BlockStage(
                    block, stage_optimizer_state(model.opt_state, lambda p, k=k: p.blocks[k])
                ),
                device,
            )
            for k, (block, device) in enumerate(zip(model.blocks, devices[:-1], strict=True))
        ]
        self.output = jax.device_put(
            OutputLayerState(
                model.output, stage_optimizer_state(model.opt_state, lambda p: p.output)
            ),
            devices[-1],
        )
        self.done = 0
        self._cursor = jax.device_put(BatchCursor(key, jnp.zeros((), jnp.int32)), devices[0])
        self._window = DispatchWindow(max_minibatches_in_flight)
        self._compiler = StageCompiler()
        self._sample: jax.stages.Compiled | None = None
        self._calls: list[BlockCalls] = []
        self._output_calls: OutputCalls | None = None

    @property
    def _micro_size(self) -> int:
        return self.config.batch_size // self.microbatches

    def compile(self) -> None:
        """Compile every stage's forward, backward and update on its device."""
        compile_, size, opt = self._compiler, self._micro_size, self.optimizer
        update = functools.partial(
            apply_mean_gradients, optimizer=opt, microbatches=self.microbatches
        )
        device = self.devices[0]
        self._sample = compile_(
            "sample",
            device,
            functools.partial(
                sample_microbatches,
                batch_size=self.config.batch_size,
                microbatches=self.microbatches,
            ),
            abstract_on(self.data, device),
            abstract_on(self._cursor, device),
        )
        self._calls = []
        h = self._sample.out_info.batches[0].h
        for k, (stage, device) in enumerate(zip(self.stages, self.devices, strict=False)):
            name = "first" if k == 0 else "hidden"
            backward = functools.partial(block_backward, send=k > 0)
            state = abstract_on(stage, device)
            forward = compile_(
                f"{name}/forward", device, block_forward, state.block, abstract_on(h, device)
            )
            fwd = forward.out_info
            self._calls.append(
                BlockCalls(
                    forward=forward,
                    backward=compile_(
                        f"{name}/backward", device, backward, fwd.vjp, fwd.output, None
                    ),
                    backward_add=compile_(
                        f"{name}/backward_add",
                        device,
                        backward,
                        fwd.vjp,
                        fwd.output,
                        state.block.params,
                    ),
                    update=compile_(
                        f"{name}/update",
                        device,
                        update,
                        state.block.params,
                        state.opt_state,
                        state.block.params,
                    ),
                )
            )
            h = fwd.output
        device = self.devices[-1]
        state = abstract_on(self.output, device)
        acts = abstract_on(Activations(h, jax.ShapeDtypeStruct((size,), jnp.int32)), device)
        self._output_calls = OutputCalls(
            microbatch=compile_("output", device, output_microbatch, state.params, acts, None),
            microbatch_add=compile_(
                "output/add", device, output_microbatch, state.params, acts, state.params
            ),
            update=compile_(
                "output/update", device, update, state.params, state.opt_state, state.params
            ),
        )

    def _minibatch(self, window: WindowMetrics) -> None:
        devices, num_hidden = self.devices, len(self.stages)
        sampled = self._sample(self.data, self._cursor)
        self._cursor = sampled.cursor
        stats = [stage.block.batch_stats for stage in self.stages]
        vjps: list[list[Callable]] = [[] for _ in self.stages]
        cotangents = []
        out_grads = None
        calls = self._output_calls
        for batch in sampled.batches:  # forward, microbatch after microbatch
            h = batch.h
            for k, stage in enumerate(self.stages):
                fwd = self._calls[k].forward(LayerVars(stage.block.params, stats[k]), h)
                stats[k] = fwd.batch_stats
                vjps[k].append(fwd.vjp)
                h = jax.device_put(fwd.output, devices[k + 1])
            inputs = Activations(h, jax.device_put(batch.labels, devices[-1]))
            call = calls.microbatch if out_grads is None else calls.microbatch_add
            out = call(self.output.params, inputs, out_grads)
            out_grads = out.grads
            cotangents.append(jax.device_put(out.input_grad, devices[num_hidden - 1]))
            window.loss.append(out.loss)
            window.accuracy.append(out.accuracy)
        grads: list[Any] = [None] * num_hidden
        for m, cotangent in enumerate(cotangents):  # backward, in the same microbatch order
            for k in reversed(range(num_hidden)):
                call = self._calls[k].backward if grads[k] is None else self._calls[k].backward_add
                back = call(vjps[k][m], cotangent, grads[k])
                grads[k] = back.grads
                if k > 0:
                    cotangent = jax.device_put(back.input_grad, devices[k - 1])
        for k, stage in enumerate(self.stages):
            new = self._calls[k].update(stage.block.params, stage.opt_state, grads[k])
            self.stages[k] = BlockStage(LayerVars(new.params, stats[k]), new.opt_state)
        new = calls.update(self.output.params, self.output.opt_state, out_grads)
        self.output = OutputLayerState(new.params, new.opt_state)
        self.done += 1
        self._window.push([s.opt_state for s in self.stages] + [self.output.opt_state])

    def advance(self, batches: int) -> WindowMetrics:
        """Train on minibatches until ``batches`` of them are done."""
        window = WindowMetrics([], [], ())
        while self.done < batches:
            self._minibatch(window)
        return window

    def block_until_ready(self) -> None:
        jax.block_until_ready((self.stages, self.output))

    def network(self, device: jax.Device) -> tuple[tuple[LayerVars, ...], Any]:
        blocks = tuple(stage.block for stage in self.stages)
        return jax.device_put((blocks, self.output.params), device)

    def model_state(self, device: jax.Device) -> BackpropState:
        opt_state = merge_optimizer_states(
            [s.opt_state for s in self.stages] + [self.output.opt_state]
        )
        blocks, output = self.network(device)
        return BackpropState(blocks, output, jax.device_put(opt_state, device))

    def _stage_alone(self, k: int, stage: BlockStage, h: jax.Array, cotangent: jax.Array):
        """Hidden stage k's work for one minibatch, on zeros (for timing)."""
        calls, stats, grads = self._calls[k], stage.block.batch_stats, None
        vjps = []
        for _ in range(self.microbatches):
            fwd = calls.forward(LayerVars(stage.block.params, stats), h)
            stats = fwd.batch_stats
            vjps.append(fwd.vjp)
        for vjp in vjps:
            call = calls.backward if grads is None else calls.backward_add
            grads = call(vjp, cotangent, grads).grads
        new = calls.update(stage.block.params, stage.opt_state, grads)
        return BlockStage(LayerVars(new.params, stats), new.opt_state)

    def _output_alone(self, state: OutputLayerState, inputs: Activations) -> OutputLayerState:
        calls, grads = self._output_calls, None
        for _ in range(self.microbatches):
            call = calls.microbatch if grads is None else calls.microbatch_add
            grads = call(state.params, inputs, grads).grads
        return OutputLayerState(*calls.update(state.params, state.opt_state, grads))

    def state_devices(self) -> tuple[int, ...]:
        return tuple(device_id_of(stage) for stage in [*self.stages, self.output])

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's work for one minibatch (M forwards, M backwards, one update), timed
        alone on its device; the first stage's time includes drawing the minibatch."""
        size, units = self._micro_size, self.config.hidden_units
        times = []
        for k, (stage, device) in enumerate(zip(self.stages, self.devices, strict=False)):
            cotangent = zeros_on((size, units), jnp.float32, device)
            if k == 0:

                def step(s: BlockStage, c: jax.Array = cotangent) -> BlockStage:
                    sampled = self._sample(self.data, self._cursor)
                    return self._stage_alone(0, s, sampled.batches[0].h, c)

            else:
                h = zeros_on((size, units), jnp.float32, device)

                def step(s: BlockStage, k: int = k, h: jax.Array = h, c=cotangent) -> BlockStage:
                    return self._stage_alone(k, s, h, c)

            times.append(time_chain(step, stage, repeats))
        device = self.devices[-1]
        inputs = Activations(
            zeros_on((size, units), jnp.float32, device), zeros_on((size,), jnp.int32, device)
        )
        times.append(time_chain(lambda s: self._output_alone(s, inputs), self.output, repeats))
        return tuple(times)

"""Backprop baselines on the layer-parallel devices: model parallelism and GPipe.

Each of the ``Trainer``'s stages lives on its device with its own optimizer state (a
``StageState``, as the single-device step keeps it), so updates are identical to the single-device
step's by construction.

A minibatch of B examples is split into M microbatches of B/M (M = 1: plain model parallelism,
"forward, then backward"). GPipe order: every microbatch goes forward through the stages, the
last stage computing its loss gradient as each arrives; then every microbatch goes backward; each
stage sums its parameter gradients over the microbatches and makes one optimizer update with their
mean (``Trainer.update_stages``). Activations move forward and cotangents backward device to
device. The backward pass uses the VJP residuals kept by the forward pass (no recomputation).

BatchNorm normalises each microbatch with that microbatch's statistics, so for M > 1 this is not
the single-device step on the whole minibatch; it equals ``accumulated_backprop_step``, which does
the same on one device. Running averages are updated once per microbatch, in microbatch order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.trainer import StageState, StepMetrics, Trainer, TrainerState, apply_module
from sgjax.data.device import DeviceData, sample_batch
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
from sgjax.training.config import TrainConfig

# --------------------------------------------------------------------------- reference


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def accumulated_backprop_step(
    trainer: Trainer,
    state: TrainerState,
    images: jax.Array,
    labels: jax.Array,
    microbatches: int,
) -> tuple[TrainerState, StepMetrics]:
    """Single-device backprop with gradients accumulated over ``microbatches`` equal slices.

    Slice m is ``images[m * B/M : (m + 1) * B/M]``; BatchNorm sees one slice at a time and its
    running averages are updated slice by slice; the update uses the mean of the slices' gradients.
    With one microbatch this is ``Trainer.step`` with ``backprop()``.
    """
    size = images.shape[0] // microbatches
    current = state
    total = None
    losses, accuracies = [], []
    for m in range(microbatches):
        x, y = images[m * size : (m + 1) * size], labels[m * size : (m + 1) * size]
        grads, collections, loss, output = trainer.backprop_gradients(current, x, y)
        current = current._replace(
            stages=tuple(
                s._replace(collections=c) for s, c in zip(current.stages, collections, strict=True)
            )
        )
        total = grads if total is None else _tree_add(total, grads)
        losses.append(loss)
        accuracies.append(trainer.accuracy(output, y))
    mean = jax.tree_util.tree_map(lambda g: g / microbatches, total)
    indices = range(len(trainer.stages))
    new = trainer.update_stages(
        state.stages, indices, mean, tuple(s.collections for s in current.stages)
    )
    loss = jnp.mean(jnp.stack(losses))
    metrics = StepMetrics(loss, jnp.mean(jnp.stack(accuracies)), jnp.zeros((0,), loss.dtype))
    return TrainerState(tuple(new[k] for k in indices), state.synthesizers), metrics


# --------------------------------------------------------------------------- stage functions


class StageForward(NamedTuple):
    output: jax.Array
    vjp: Callable
    """VJP of the stage at (params, input): cotangent -> (param grads, input grad); a pytree."""
    collections: Any


class StageBackward(NamedTuple):
    grads: Any
    """Parameter gradients summed over the microbatches so far."""
    input_grad: jax.Array | None


class LastMicrobatch(NamedTuple):
    grads: Any
    """Parameter gradients summed over the microbatches so far."""
    input_grad: jax.Array
    collections: Any
    loss: jax.Array
    accuracy: jax.Array


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


def stage_forward(
    params: Any, collections: Any, h: jax.Array, *, trainer: Trainer, k: int
) -> StageForward:
    """Stage ``k``'s training-mode output, its VJP and its updated other variables."""
    output, vjp, new = jax.vjp(
        lambda p, x: apply_module(trainer.stages[k], p, collections, x, train=True),
        params,
        h,
        has_aux=True,
    )
    return StageForward(output, vjp, new)


def stage_backward(
    vjp: Callable, cotangent: jax.Array, accumulated: Any | None, *, send: bool = True
) -> StageBackward:
    """Parameter gradients (added to ``accumulated``) and, if ``send``, the input's cotangent."""
    grads, input_grad = vjp(cotangent)
    if accumulated is not None:
        grads = _tree_add(accumulated, grads)
    return StageBackward(grads, input_grad if send else None)


def last_microbatch(
    params: Any,
    collections: Any,
    inputs: Activations,
    accumulated: Any | None,
    *,
    trainer: Trainer,
) -> LastMicrobatch:
    """The last stage's gradients on one microbatch (added to ``accumulated``), dLoss/dh."""
    module = trainer.stages[-1]

    def loss_fn(p: Any, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        output, new = apply_module(module, p, collections, x, train=True)
        return trainer.loss(output, inputs.labels), (output, new)

    (loss, (output, new)), (grads, h_grad) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
        params, inputs.h
    )
    if accumulated is not None:
        grads = _tree_add(accumulated, grads)
    return LastMicrobatch(grads, h_grad, new, loss, trainer.accuracy(output, inputs.labels))


def apply_mean_gradients(
    state: StageState,
    grad_sum: Any,
    collections: Any,
    *,
    trainer: Trainer,
    k: int,
    microbatches: int,
) -> StageState:
    """Stage ``k``'s optimizer update with the mean of the microbatches' gradients."""
    mean = jax.tree_util.tree_map(lambda g: g / microbatches, grad_sum)
    return trainer.update_stages({k: state}, [k], [mean], [collections])[k]


class StageCalls(NamedTuple):
    forward: jax.stages.Compiled
    backward: jax.stages.Compiled
    """First microbatch: nothing accumulated yet."""
    backward_add: jax.stages.Compiled
    update: jax.stages.Compiled


class LastCalls(NamedTuple):
    microbatch: jax.stages.Compiled
    microbatch_add: jax.stages.Compiled
    update: jax.stages.Compiled


class BackpropPipeline:
    """Model-parallel backprop (``microbatches=1``) or GPipe over ``devices`` (one per stage);
    an Engine. ``step`` is the number of minibatches ``model`` has trained on (nothing is in
    flight between minibatches, so that is all a resumed pipeline needs)."""

    def __init__(
        self,
        trainer: Trainer,
        config: TrainConfig,
        data: DeviceData,
        devices: tuple[jax.Device, ...],
        model: TrainerState,
        key: jax.Array,
        microbatches: int = 1,
        max_minibatches_in_flight: int = 4,
        *,
        step: int = 0,
    ) -> None:
        if trainer.decoupled:
            raise ValueError("model-parallel and GPipe backprop need a backprop Trainer")
        self.trainer = trainer
        self.config = config
        self.data = data
        self.devices = devices
        self.microbatches = microbatches
        self.stages = [jax.device_put(s, d) for s, d in zip(model.stages, devices, strict=True)]
        self.done = step
        index = jnp.asarray(step, jnp.int32)
        self._cursor = jax.device_put(BatchCursor(key, index), devices[0])
        self._window = DispatchWindow(max_minibatches_in_flight)
        self._compiler = StageCompiler()
        self._sample: jax.stages.Compiled | None = None
        self._calls: list[StageCalls] = []
        self._last_calls: LastCalls | None = None

    def inflight(self) -> dict[str, jax.Array]:
        """Nothing is in flight between minibatches."""
        return {}

    def compile(self) -> None:
        """Compile every stage's forward, backward and update on its device."""
        trainer, compile_ = self.trainer, self._compiler
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

        def update(k: int) -> Callable:
            return functools.partial(
                apply_mean_gradients, trainer=trainer, k=k, microbatches=self.microbatches
            )

        self._calls = []
        batch = self._sample.out_info.batches[0]
        h = batch.h
        last = len(self.stages) - 1
        for k, (stage, device) in enumerate(zip(self.stages[:-1], self.devices, strict=False)):
            backward = functools.partial(stage_backward, send=k > 0)
            state = abstract_on(stage, device)
            forward = compile_(
                f"{k}/forward",
                device,
                functools.partial(stage_forward, trainer=trainer, k=k),
                state.params,
                state.collections,
                abstract_on(h, device),
            )
            fwd = forward.out_info
            self._calls.append(
                StageCalls(
                    forward=forward,
                    backward=compile_(f"{k}/backward", device, backward, fwd.vjp, fwd.output, None),
                    backward_add=compile_(
                        f"{k}/backward_add", device, backward, fwd.vjp, fwd.output, state.params
                    ),
                    update=compile_(
                        f"{k}/update", device, update(k), state, state.params, state.collections
                    ),
                )
            )
            h = fwd.output
        device = self.devices[-1]
        state = abstract_on(self.stages[-1], device)
        acts = abstract_on(Activations(h, batch.labels), device)
        micro = functools.partial(last_microbatch, trainer=trainer)
        self._last_calls = LastCalls(
            microbatch=compile_("last", device, micro, state.params, state.collections, acts, None),
            microbatch_add=compile_(
                "last/add", device, micro, state.params, state.collections, acts, state.params
            ),
            update=compile_(
                "last/update", device, update(last), state, state.params, state.collections
            ),
        )

    def _minibatch(self, window: WindowMetrics) -> None:
        devices, num_hidden = self.devices, len(self.stages) - 1
        sampled = self._sample(self.data, self._cursor)
        self._cursor = sampled.cursor
        collections = [stage.collections for stage in self.stages]
        vjps: list[list[Callable]] = [[] for _ in range(num_hidden)]
        cotangents = []
        last_grads = None
        calls = self._last_calls
        last = self.stages[-1]
        for batch in sampled.batches:  # forward, microbatch after microbatch
            h = batch.h
            for k in range(num_hidden):
                fwd = self._calls[k].forward(self.stages[k].params, collections[k], h)
                collections[k] = fwd.collections
                vjps[k].append(fwd.vjp)
                h = jax.device_put(fwd.output, devices[k + 1])
            inputs = Activations(h, jax.device_put(batch.labels, devices[-1]))
            call = calls.microbatch if last_grads is None else calls.microbatch_add
            out = call(last.params, collections[-1], inputs, last_grads)
            last_grads, collections[-1] = out.grads, out.collections
            if num_hidden:
                cotangents.append(jax.device_put(out.input_grad, devices[num_hidden - 1]))
            window.loss.append(out.loss)
            window.accuracy.append(out.accuracy)
        grads: list[Any] = [None] * num_hidden
        for cotangent_m, cotangent in enumerate(cotangents):  # backward, same microbatch order
            for k in reversed(range(num_hidden)):
                call = self._calls[k].backward if grads[k] is None else self._calls[k].backward_add
                back = call(vjps[k][cotangent_m], cotangent, grads[k])
                grads[k] = back.grads
                if k > 0:
                    cotangent = jax.device_put(back.input_grad, devices[k - 1])
        for k in range(num_hidden):
            self.stages[k] = self._calls[k].update(self.stages[k], grads[k], collections[k])
        self.stages[-1] = calls.update(last, last_grads, collections[-1])
        self.done += 1
        self._window.push([s.opt_state for s in self.stages])

    def advance(self, batches: int) -> WindowMetrics:
        """Train on minibatches until ``batches`` of them are done."""
        window = WindowMetrics([], [], ())
        while self.done < batches:
            self._minibatch(window)
        return window

    def block_until_ready(self) -> None:
        jax.block_until_ready(self.stages)

    def model_state(self, device: jax.Device) -> TrainerState:
        return jax.device_put(TrainerState(tuple(self.stages), ()), device)

    def _stage_alone(self, k: int, stage: StageState, h: jax.Array, cotangent: jax.Array):
        """Stage k's work for one minibatch, on zeros (for timing)."""
        calls, collections, grads = self._calls[k], stage.collections, None
        vjps = []
        for _ in range(self.microbatches):
            fwd = calls.forward(stage.params, collections, h)
            collections = fwd.collections
            vjps.append(fwd.vjp)
        for vjp in vjps:
            call = calls.backward if grads is None else calls.backward_add
            grads = call(vjp, cotangent, grads).grads
        return calls.update(stage, grads, collections)

    def _last_alone(self, state: StageState, inputs: Activations) -> StageState:
        calls, grads, collections = self._last_calls, None, state.collections
        for _ in range(self.microbatches):
            call = calls.microbatch if grads is None else calls.microbatch_add
            out = call(state.params, collections, inputs, grads)
            grads, collections = out.grads, out.collections
        return calls.update(state, grads, collections)

    def state_devices(self) -> tuple[int, ...]:
        return tuple(device_id_of(stage) for stage in self.stages)

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's work for one minibatch (M forwards, M backwards, one update), timed
        alone on its device; the first stage's time includes drawing the minibatch."""
        times = []
        for k, (stage, device) in enumerate(zip(self.stages[:-1], self.devices, strict=False)):
            info = self._calls[k].forward.out_info.output
            cotangent = zeros_on(info.shape, info.dtype, device)
            if k == 0:

                def step(s: StageState, c: jax.Array = cotangent) -> StageState:
                    sampled = self._sample(self.data, self._cursor)
                    return self._stage_alone(0, s, sampled.batches[0].h, c)

            else:
                info = self._calls[k - 1].forward.out_info.output
                h = zeros_on(info.shape, info.dtype, device)

                def step(s: StageState, k: int = k, h: jax.Array = h, c=cotangent) -> StageState:
                    return self._stage_alone(k, s, h, c)

            times.append(time_chain(step, stage, repeats))
        device = self.devices[-1]
        info = self._calls[-1].forward.out_info.output if self._calls else None
        size = self.config.batch_size // self.microbatches
        inputs = Activations(
            zeros_on(info.shape, info.dtype, device), zeros_on((size,), jnp.int32, device)
        )
        times.append(time_chain(lambda s: self._last_alone(s, inputs), self.stages[-1], repeats))
        return tuple(times)

"""Layer-parallel synthetic gradients: every stage on its own device, pipelined.

Stages are 1-based here: hidden blocks i = 1..L (each with its module M_i and both Adam states),
then the output layer, stage L+1. Minibatches b = 0..N-1 are drawn as in the single-device loop.
At tick t stage i works on minibatch b = t - (i - 1), so every stage has a different minibatch:

* hidden stage i: h_i^b = f_i(theta_i, h_{i-1}^b) (h_{i-1}^b arrived from stage i-1, produced at
  tick t-1), g_i^b = M_i(h_i^b), block update with the VJP of g_i^b; sends (h_i^b, labels) on to
  stage i+1 and the message VJP_{h_{i-1}}(g_i^b) back to stage i-1 (t_{i-1}^b, M_{i-1}'s target);
* output stage: trains on h_L^b with the true loss and sends dLoss/dh_L^b back (t_L^b);
* a target t_i^b arrives at stage i two ticks after it produced h_i^b. Stage i keeps its last
  outputs (h_i, labels) in a FIFO and, when t_i^b arrives, updates M_i towards it on the stored
  h_i^b, re-running M_i with its current parameters (no stale VJP residuals are kept).

Each stage's tick is one jitted pure function, compiled for its device; the host dispatches every
stage of a tick before waiting for anything, and messages move device to device
(``jax.device_put`` of a device array), never through the host. Filling and draining are done by
the host loop: a stage runs only when it has an input or a target, so N minibatches take N + L + 1
ticks.

Staleness, exactly. Write theta_i^(n), phi_i^(n), omega^(n) for block i, module M_i and the output
layer after n updates. Stage i trains on minibatch b at tick b + i - 1, after the ticks of
minibatches 0..b-1, and M_i learns from t_i^b at tick b + i + 1. So for minibatch b:

* forward: every block j computes h_j^b with theta_j^(b); the output layer uses omega^(b);
  t_L^b = dLoss/dh_L^b at omega^(b);
* block i's update uses g_i^b = M_i(h_i^b; phi_i^(b')) with b' = max(b - 2, 0);
* t_i^b (i < L) is the VJP of f_{i+1} at (theta_{i+1}^(b), h_i^b) with g_{i+1}^b, also from
  phi_{i+1}^(b');
* M_i's regression towards t_i^b evaluates M_i(h_i^b; phi_i^(b)).

Synchronous sg (``steps.decoupled_step``) uses phi^(b) everywhere. The only difference is that
the synthetic gradients used to update blocks and to bootstrap targets come from modules two
updates old; block, output and module updates are the same in number (N each) and in the
parameter versions they start from. (tests/test_parallel.py checks this statement against
``decoupled_gradients`` driven by a module copy two updates old.)
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax.data.device import DeviceData, sample_batch
from sgjax.layers import accuracy
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
    DecoupledState,
    HiddenLayerState,
    LayerVars,
    NetworkSpec,
    OutputLayerState,
    adam_update,
    hidden_backward,
    hidden_forward,
    output_backward,
)
from sgjax.synthetic import apply_module
from sgjax.training.config import TrainConfig


class ModuleGradients(NamedTuple):
    grads: Any
    sg_loss: jax.Array


class HiddenTick(NamedTuple):
    """A hidden stage's tick: its new state and the messages it sends (None where none)."""

    layer: HiddenLayerState
    sent: Activations | None
    """(h_i, labels) for stage i+1 (and for this stage's FIFO)."""
    message: jax.Array | None
    """VJP_{h_{i-1}}(g_i): the target for module i-1."""
    sg_loss: jax.Array | None


class FirstStageTick(NamedTuple):
    tick: HiddenTick
    cursor: BatchCursor


class OutputTick(NamedTuple):
    output: OutputLayerState
    message: jax.Array
    """dLoss/dh_L: the target for module L."""
    loss: jax.Array
    accuracy: jax.Array


def module_gradients(
    layer: HiddenLayerState, stored: Activations, target: jax.Array, spec: NetworkSpec
) -> ModuleGradients:
    """M_i's gradient towards a constant target on a stored h_i, with M_i's current parameters.

    The loss is ``hidden_backward``'s: mean over the batch of ||M_i(h_i) - t_i||^2.
    """
    synthetic, module_vjp, _ = jax.vjp(
        lambda p: apply_module(
            spec.module(), p, layer.module.batch_stats, stored.h, stored.labels, True
        ),
        layer.module.params,
        has_aux=True,
    )
    error = synthetic - jax.lax.stop_gradient(target)
    batch = error.shape[0]
    (grads,) = module_vjp(2.0 * error / batch)
    return ModuleGradients(grads, jnp.sum(jnp.square(error)) / batch)


def hidden_tick(
    layer: HiddenLayerState,
    inputs: Activations | None,
    stored: Activations | None,
    target: jax.Array | None,
    *,
    spec: NetworkSpec,
    optimizer: optax.GradientTransformation,
    send_message: bool = True,
) -> HiddenTick:
    """One tick of hidden stage i: forward and block update on ``inputs`` (if any), M_i's update
    towards ``target`` on ``stored`` (if any). Both read the parameters the tick started with."""
    block, block_opt = layer.block, layer.block_opt
    module, module_opt = layer.module, layer.module_opt
    sent = message = sg_loss = None
    if inputs is not None:
        fwd = hidden_forward(layer, inputs.h, inputs.labels, spec)
        # Only the block's half of hidden_backward is used (M_i learns from `target` below);
        # the module half, computed against a dummy target, is dropped by the compiler.
        grads = hidden_backward(fwd, fwd.synthetic_grad)
        params, block_opt = adam_update(optimizer, grads.block, layer.block_opt, block.params)
        block = LayerVars(params, fwd.block_stats)
        module = LayerVars(module.params, fwd.module_stats)
        sent = Activations(fwd.output, inputs.labels)
        message = grads.input_grad if send_message else None
    if stored is not None and target is not None:
        regression = module_gradients(layer, stored, target, spec)
        params, module_opt = adam_update(
            optimizer, regression.grads, layer.module_opt, layer.module.params
        )
        module = LayerVars(params, module.batch_stats)
        sg_loss = regression.sg_loss
    return HiddenTick(
        HiddenLayerState(block, module, block_opt, module_opt), sent, message, sg_loss
    )


def first_stage_tick(
    layer: HiddenLayerState,
    data: DeviceData,
    cursor: BatchCursor,
    stored: Activations | None,
    target: jax.Array | None,
    *,
    spec: NetworkSpec,
    optimizer: optax.GradientTransformation,
    batch_size: int,
) -> FirstStageTick:
    """Stage 1's tick: draw minibatch ``cursor.index`` on the device, then ``hidden_tick``."""
    batch = sample_batch(jax.random.fold_in(cursor.key, cursor.index), data, batch_size)
    tick = hidden_tick(
        layer,
        Activations(batch.images, batch.labels),
        stored,
        target,
        spec=spec,
        optimizer=optimizer,
        send_message=False,
    )
    return FirstStageTick(tick, cursor._replace(index=cursor.index + 1))


def output_tick(
    state: OutputLayerState, inputs: Activations, *, optimizer: optax.GradientTransformation
) -> OutputTick:
    """The output stage's tick: true-gradient update; dLoss/dh_L goes back to stage L."""
    grads, h_grad, loss, logits = output_backward(state.params, inputs.h, inputs.labels)
    params, opt_state = adam_update(optimizer, grads, state.opt_state, state.params)
    return OutputTick(
        OutputLayerState(params, opt_state), h_grad, loss, accuracy(logits, inputs.labels)
    )


class StageCalls(NamedTuple):
    """A hidden stage's compiled tick in its three forms."""

    fill: jax.stages.Compiled
    """Input, no target yet (the first two ticks)."""
    steady: jax.stages.Compiled
    """Input and target."""
    drain: jax.stages.Compiled
    """Target only (the two ticks after its last input)."""


class SgPipeline:
    """The pipelined synthetic-gradient schedule over ``devices`` (one per stage); an Engine."""

    def __init__(
        self,
        config: TrainConfig,
        data: DeviceData,
        devices: tuple[jax.Device, ...],
        model: DecoupledState,
        key: jax.Array,
        optimizer: optax.GradientTransformation,
        max_ticks_in_flight: int = 4,
    ) -> None:
        self.config = config
        self.spec = NetworkSpec.from_config(config)
        self.optimizer = optimizer
        self.data = data
        self.devices = devices
        self.hidden = [
            jax.device_put(layer, device)
            for layer, device in zip(model.hidden, devices[:-1], strict=True)
        ]
        self.output = jax.device_put(model.output, devices[-1])
        self.tick = 0
        self._cursor = jax.device_put(BatchCursor(key, jnp.zeros((), jnp.int32)), devices[0])
        self._fifo: list[collections.deque[Activations]] = [
            collections.deque() for _ in model.hidden
        ]
        self._inbox: dict[int, Activations] = {}
        """Activations arriving at stage k this tick."""
        self._targets: dict[int, jax.Array] = {}
        """Targets arriving at hidden stage k this tick."""
        self._window = DispatchWindow(max_ticks_in_flight)
        self._compiler = StageCompiler()
        self._calls: list[StageCalls] = []
        self._output_call: jax.stages.Compiled | None = None

    def _example_activations(self) -> Activations:
        batch, units = self.config.batch_size, self.spec.hidden_units
        return Activations(
            jax.ShapeDtypeStruct((batch, units), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )

    def compile(self) -> None:
        """Compile each stage's tick functions on its device (shared by equal stages)."""
        config, opt = self.config, self.optimizer
        tick = functools.partial(hidden_tick, spec=self.spec, optimizer=opt)
        last = functools.partial(tick, send_message=False)
        first = functools.partial(
            first_stage_tick, spec=self.spec, optimizer=opt, batch_size=config.batch_size
        )
        compile_ = self._compiler
        self._calls = []
        for k, (layer, device) in enumerate(zip(self.hidden, self.devices, strict=False)):
            state = abstract_on(layer, device)
            acts = abstract_on(self._example_activations(), device)
            target = acts.h
            if k == 0:
                data, cursor = abstract_on(self.data, device), abstract_on(self._cursor, device)
                calls = StageCalls(
                    fill=compile_("first/fill", device, first, state, data, cursor, None, None),
                    steady=compile_(
                        "first/steady", device, first, state, data, cursor, acts, acts.h
                    ),
                    drain=compile_("first/drain", device, last, state, None, acts, target),
                )
            else:
                calls = StageCalls(
                    fill=compile_("hidden/fill", device, tick, state, acts, None, None),
                    steady=compile_("hidden/steady", device, tick, state, acts, acts, target),
                    drain=compile_("hidden/drain", device, tick, state, None, acts, target),
                )
            self._calls.append(calls)
        device = self.devices[-1]
        self._output_call = compile_(
            "output",
            device,
            functools.partial(output_tick, optimizer=opt),
            abstract_on(self.output, device),
            abstract_on(self._example_activations(), device),
        )

    def _run_tick(self, window: WindowMetrics) -> None:
        t, num_hidden, num_batches = self.tick, len(self.hidden), self.config.num_steps
        inbox: dict[int, Activations] = {}
        targets: dict[int, jax.Array] = {}
        dispatched: list[jax.Array] = []
        for k, calls in enumerate(self._calls):
            has_input = 0 <= t - k < num_batches
            target = self._targets.get(k)
            stored = self._fifo[k].popleft() if target is not None else None
            call = calls.steady if target is not None else calls.fill
            if has_input and k == 0:
                first = call(self.hidden[k], self.data, self._cursor, stored, target)
                self._cursor, out = first.cursor, first.tick
            elif has_input:
                out = call(self.hidden[k], self._inbox[k], stored, target)
            elif target is not None:
                out = calls.drain(self.hidden[k], None, stored, target)
            else:
                continue
            self.hidden[k] = out.layer
            dispatched.append(out.layer.block_opt)
            if out.sent is not None:
                self._fifo[k].append(out.sent)
                inbox[k + 1] = jax.device_put(out.sent, self.devices[k + 1])
            if out.message is not None:
                targets[k - 1] = jax.device_put(out.message, self.devices[k - 1])
            if out.sg_loss is not None:
                window.sg_loss[k].append(out.sg_loss)
        if 0 <= t - num_hidden < num_batches:
            out = self._output_call(self.output, self._inbox[num_hidden])
            self.output = out.output
            targets[num_hidden - 1] = jax.device_put(out.message, self.devices[num_hidden - 1])
            window.loss.append(out.loss)
            window.accuracy.append(out.accuracy)
            dispatched.append(out.loss)
        self._inbox, self._targets = inbox, targets
        self.tick += 1
        self._window.push(dispatched)

    def advance(self, batches: int) -> WindowMetrics:
        """Run ticks until the output layer has trained on ``batches`` minibatches; for the
        run's last minibatch also the drain ticks, after which every module has had its N
        updates."""
        window = WindowMetrics([], [], tuple([] for _ in self.hidden))
        last_tick = batches - 1 + len(self.hidden)
        if batches == self.config.num_steps:
            last_tick += 1
        while self.tick <= last_tick:
            self._run_tick(window)
        return window

    def block_until_ready(self) -> None:
        jax.block_until_ready((self.hidden, self.output))

    def network(self, device: jax.Device) -> tuple[tuple[LayerVars, ...], Any]:
        blocks = tuple(layer.block for layer in self.hidden)
        return jax.device_put((blocks, self.output.params), device)

    def model_state(self, device: jax.Device) -> DecoupledState:
        return jax.device_put(DecoupledState(tuple(self.hidden), self.output), device)

    def state_devices(self) -> tuple[int, ...]:
        return tuple(device_id_of(stage) for stage in [*self.hidden, self.output])

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's steady-state tick, timed alone on its device (zeros as messages)."""
        times = []
        batch, units = self.config.batch_size, self.spec.hidden_units
        for k, (calls, device) in enumerate(zip(self._calls, self.devices, strict=False)):
            acts = Activations(
                zeros_on((batch, units), jnp.float32, device),
                zeros_on((batch,), jnp.int32, device),
            )
            if k == 0:
                start = FirstStageTick(HiddenTick(self.hidden[0], None, None, None), self._cursor)
                times.append(
                    time_chain(
                        lambda s, c=calls, a=acts: c.steady(
                            s.tick.layer, self.data, s.cursor, a, a.h
                        ),
                        start,
                        repeats,
                    )
                )
            else:
                times.append(
                    time_chain(
                        lambda s, c=calls, a=acts: c.steady(s, a, a, a.h).layer,
                        self.hidden[k],
                        repeats,
                    )
                )
        device = self.devices[-1]
        acts = Activations(
            zeros_on((batch, units), jnp.float32, device), zeros_on((batch,), jnp.int32, device)
        )
        times.append(time_chain(lambda s: self._output_call(s, acts).output, self.output, repeats))
        return tuple(times)

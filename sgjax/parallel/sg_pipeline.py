"""Layer-parallel synthetic gradients: every group of the ``Trainer`` on its own device, pipelined.

Pipeline stages are the ``Trainer``'s groups, 1-based here: the decoupled groups i = 1..L (each
with its synthesizer M_i, all with their optimizer states), then the last group, stage L+1 (for
the paper's MLP: the hidden blocks, then the output layer). Minibatches b = 0..N-1 are drawn as in
the single-device loop. At tick t stage i works on minibatch b = t - (i - 1), so every stage has a
different minibatch:

* decoupled stage i: h_i^b = f_i(theta_i, h_{i-1}^b) (h_{i-1}^b arrived from stage i-1, produced
  at tick t-1), g_i^b = M_i(h_i^b), group update with the VJP of g_i^b (``Trainer.group_forward``,
  ``group_backward``); sends (h_i^b, labels) on to stage i+1 and the message VJP_{h_{i-1}}(g_i^b)
  back to stage i-1 (t_{i-1}^b, M_{i-1}'s target);
* last stage: trains on h_L^b with the true loss and sends dLoss/dh_L^b back (t_L^b)
  (``Trainer.last_group_gradients``);
* a target t_i^b arrives at stage i two ticks after it produced h_i^b. Stage i keeps its last
  outputs (h_i, labels) in a FIFO and, when t_i^b arrives, updates M_i towards it on the stored
  h_i^b, re-running M_i with its current parameters (``Trainer.synthesizer_gradients``; no stale
  VJP residuals are kept).

Each stage's tick is one jitted pure function, compiled for its device; the host dispatches every
stage of a tick before waiting for anything, and messages move device to device
(``jax.device_put`` of a device array), never through the host. Filling and draining are done by
the host loop: a stage runs only when it has an input or a target, so N minibatches take N + L + 1
ticks.

Staleness, exactly. Write theta_i^(n), phi_i^(n), omega^(n) for group i, module M_i and the last
group after n updates. Stage i trains on minibatch b at tick b + i - 1, after the ticks of
minibatches 0..b-1, and M_i learns from t_i^b at tick b + i + 1. So for minibatch b:

* forward: every group j computes h_j^b with theta_j^(b); the last group uses omega^(b);
  t_L^b = dLoss/dh_L^b at omega^(b);
* group i's update uses g_i^b = M_i(h_i^b; phi_i^(b')) with b' = max(b - 2, 0);
* t_i^b (i < L) is the VJP of f_{i+1} at (theta_{i+1}^(b), h_i^b) with g_{i+1}^b, also from
  phi_{i+1}^(b');
* M_i's regression towards t_i^b evaluates M_i(h_i^b; phi_i^(b)).

Synchronous sg (``Trainer.step``) uses phi^(b) everywhere. The only difference is that the
synthetic gradients used to update groups and to bootstrap targets come from modules two updates
old; group, last-group and module updates are the same in number (N each) and in the parameter
versions they start from. (tests/test_parallel.py checks this statement against
``Trainer.decoupled_gradients`` driven by a module copy two updates old.)

Other decoupled methods. Greedy local learning (dgl) and the zero gradient send nothing back
(``Trainer.local``): each decoupled stage updates from its own auxiliary head, or with a zero
gradient, on the tick it receives its input, and there are no targets and no FIFO. Stage j still
trains on minibatch b with theta_j^(b), so the pipeline computes exactly the synchronous steps
(``Trainer.step``). With --update_prob=p (``Coins``) every stage draws, for the minibatch it works
on, the coin the single-device loop draws for its group at that step (``Trainer.group_coin``):
group j's update on minibatch b is kept only if it comes up, and so is M_j's regression towards
t_j^b two ticks later (and the statistics of M_j's forward pass on b), as ``Trainer.step`` keeps
or drops a group with its module. (tests/test_parallel.py checks both against single-device
references.) The complete unlock (synthetic inputs) has a schedule of its own
(``sgjax.parallel.unlocked``); the stale gradient and BP(lambda) do not run layer-parallel
(``TrainConfig.validate`` says why).

Minibatches in flight (the FIFOs, the activations and targets arriving next tick) are part of the
pipeline's state: ``inflight()`` returns them by name and a pipeline built with them continues
exactly where the one that gave them stopped (checkpoints).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.trainer import StageState, Trainer, TrainerState
from sgjax.data.device import DeviceData, sample_batch
from sgjax.parallel.stages import (
    Activations,
    BatchCursor,
    DispatchWindow,
    StageCompiler,
    WindowMetrics,
    abstract_on,
    device_id_of,
    indexed_group,
    kept,
    time_chain,
    zeros_on,
)
from sgjax.training.config import TrainConfig


class GroupState(NamedTuple):
    """A decoupled group on its device: its stages' states and its synthesizer's."""

    stages: tuple[StageState, ...]
    synthesizer: StageState


class HiddenTick(NamedTuple):
    """A decoupled stage's tick: its new state and the messages it sends (None where none)."""

    group: GroupState
    sent: Activations | None
    """(h_i, labels) for stage i+1 (and for this stage's FIFO)."""
    message: jax.Array | None
    """VJP_{h_{i-1}}(g_i): the target for module i-1 (None for the first group)."""
    sg_loss: jax.Array | None


class FirstStageTick(NamedTuple):
    tick: HiddenTick
    cursor: BatchCursor


class OutputTick(NamedTuple):
    stages: tuple[StageState, ...]
    message: jax.Array
    """dLoss/dh_L: the target for module L."""
    loss: jax.Array
    accuracy: jax.Array


class Coins(NamedTuple):
    """Where a stage draws its stochastic updates' coins (``--update_prob`` < 1): the run's batch
    key and the tick. Minibatch b's coin for group j is ``Trainer.group_coin(key, b, j, p)``,
    the single-device loop's draw for step b."""

    key: jax.Array
    tick: jax.Array


def _local_update(
    group: GroupState, inputs: Activations, *, trainer: Trainer, j: int
) -> tuple[GroupState, jax.Array, jax.Array]:
    """A decoupled group that learns from what it computes itself (``Trainer.local``): greedy
    local learning (its auxiliary head's loss) or the zero gradient. The group's new state, its
    output and its local loss (0 for the zero gradient), as ``Trainer.step`` computes them."""
    stages, head = group.stages, group.synthesizer
    indexed = indexed_group(trainer, j, stages)
    local, out = trainer.local_group_gradients(indexed, head, j, inputs.h, inputs.labels)
    grads, collections, loss = local.stages, local.collections, local.loss
    head = trainer.update_head(head, local.head, local.head_collections)
    new = trainer.update_stages(indexed, trainer.groups[j], grads, collections)
    return GroupState(tuple(new[k] for k in trainer.groups[j]), head), out, loss


def hidden_tick(
    group: GroupState,
    inputs: Activations | None,
    stored: Activations | None,
    target: jax.Array | None,
    coins: Coins | None = None,
    *,
    trainer: Trainer,
    j: int,
    update_prob: float = 1.0,
) -> HiddenTick:
    """One tick of decoupled group ``j``: forward and group update on ``inputs`` (if any), its
    synthesizer's update towards ``target`` on ``stored`` (if any). Both read the parameters the
    tick started with. With ``coins`` each part is kept only if minibatch b's coin for group j
    says so (b = tick - j for the input, tick - j - 2 for the target), as ``Trainer.step`` with
    ``update_prob`` keeps or drops group j and its module as a whole.

    For local methods (``Trainer.local``: greedy local learning, zero gradient) the group and its
    boundary state (DGL's head) update on ``inputs`` and there is no message and no target."""
    stages, synthesizer = group.stages, group.synthesizer
    sent = message = sg_loss = None
    update = learn = None
    if coins is not None:
        update = trainer.group_coin(coins.key, coins.tick - j, j, update_prob)
        learn = trainer.group_coin(coins.key, coins.tick - j - 2, j, update_prob)
    if trainer.local:
        if inputs is not None:
            new, out, sg_loss = _local_update(group, inputs, trainer=trainer, j=j)
            group = kept(update, new, group)
            sent = Activations(out, inputs.labels)
        return HiddenTick(group, sent, None, sg_loss)
    if inputs is not None:
        indexed = indexed_group(trainer, j, stages)
        fwd = trainer.group_forward(indexed, synthesizer, j, inputs.h, inputs.labels)
        # Only the group's half of group_backward is used (M learns from `target` below); the
        # synthesizer half, computed against a dummy target, is dropped by the compiler.
        grads = trainer.group_backward(fwd, fwd.synthetic_grad)
        new = trainer.update_stages(indexed, trainer.groups[j], grads.stages, fwd.collections)
        stages = kept(update, tuple(new[k] for k in trainer.groups[j]), stages)
        synthesizer = synthesizer._replace(
            collections=kept(update, fwd.synthesizer_collections, synthesizer.collections)
        )
        sent = Activations(fwd.output, inputs.labels)
        message = grads.input_grad
    if stored is not None and target is not None:
        regression = trainer.synthesizer_gradients(
            group.synthesizer, stored.h, stored.labels, target
        )
        learnt = trainer.update_synthesizer(
            group.synthesizer, regression.grads, synthesizer.collections
        )
        synthesizer = kept(learn, learnt, synthesizer)
        sg_loss = regression.sg_loss
    return HiddenTick(GroupState(stages, synthesizer), sent, message, sg_loss)


def first_stage_tick(
    group: GroupState,
    data: DeviceData,
    cursor: BatchCursor,
    stored: Activations | None,
    target: jax.Array | None,
    coins: Coins | None = None,
    *,
    trainer: Trainer,
    batch_size: int,
    update_prob: float = 1.0,
) -> FirstStageTick:
    """Stage 1's tick: draw minibatch ``cursor.index`` on the device, then ``hidden_tick``."""
    batch = sample_batch(jax.random.fold_in(cursor.key, cursor.index), data, batch_size)
    inputs = Activations(batch.images, batch.labels)
    tick = hidden_tick(
        group, inputs, stored, target, coins, trainer=trainer, j=0, update_prob=update_prob
    )
    return FirstStageTick(tick, cursor._replace(index=cursor.index + 1))


def output_tick(
    stages: tuple[StageState, ...],
    inputs: Activations,
    coins: Coins | None = None,
    *,
    trainer: Trainer,
    update_prob: float = 1.0,
) -> OutputTick:
    """The last group's tick: true-gradient update; dLoss/dh_L goes back to stage L (with
    ``coins``: the update kept only if minibatch tick - L's coin for the last group says so)."""
    j = len(trainer.groups) - 1
    indexed = indexed_group(trainer, j, stages)
    last = trainer.last_group_gradients(indexed, inputs.h, inputs.labels)
    new = trainer.update_stages(indexed, trainer.groups[j], last.stages, last.collections)
    update = None
    if coins is not None:
        update = trainer.group_coin(coins.key, coins.tick - j, j, update_prob)
    return OutputTick(
        kept(update, tuple(new[k] for k in trainer.groups[j]), stages),
        last.input_grad,
        last.loss,
        trainer.accuracy(last.output, inputs.labels),
    )


class StageCalls(NamedTuple):
    """A decoupled stage's compiled tick in its three forms."""

    fill: jax.stages.Compiled
    """Input, no target yet (the first two ticks)."""
    steady: jax.stages.Compiled
    """Input and target."""
    drain: jax.stages.Compiled
    """Target only (the two ticks after its last input)."""


def split_groups(trainer: Trainer, model: TrainerState) -> tuple[list[GroupState], tuple]:
    """The decoupled groups' states and the last group's stage states."""
    stages = model.stages
    groups = [
        GroupState(tuple(stages[k] for k in trainer.groups[j]), model.synthesizers[j])
        for j in range(len(trainer.groups) - 1)
    ]
    return groups, tuple(stages[k] for k in trainer.groups[-1])


class SgPipeline:
    """The pipelined synthetic-gradient schedule over ``devices`` (one per group); an Engine.

    ``step`` > 0 continues a pipeline whose last group had trained on ``step`` minibatches when
    it gave ``model`` and ``inflight`` (``SgPipeline.inflight``).
    """

    def __init__(
        self,
        trainer: Trainer,
        config: TrainConfig,
        data: DeviceData,
        devices: tuple[jax.Device, ...],
        model: TrainerState,
        key: jax.Array,
        max_ticks_in_flight: int = 4,
        *,
        step: int = 0,
        inflight: Mapping[str, jax.Array] | None = None,
    ) -> None:
        if not trainer.decoupled:
            raise ValueError("the synthetic-gradient pipeline needs a decoupled Trainer")
        self.trainer = trainer
        self.config = config
        self.data = data
        self.devices = devices
        groups, last = split_groups(trainer, model)
        self.hidden = [jax.device_put(g, d) for g, d in zip(groups, devices[:-1], strict=True)]
        self.output = jax.device_put(last, devices[-1])
        self.tick = self._tick_after(step)
        index = jnp.asarray(min(self.tick, config.num_steps), jnp.int32)
        self._cursor = jax.device_put(BatchCursor(key, index), devices[0])
        self._fifo: list[collections.deque[Activations]] = [collections.deque() for _ in groups]
        self._inbox: dict[int, Activations] = {}
        """Activations arriving at stage k this tick."""
        self._targets: dict[int, jax.Array] = {}
        """Targets arriving at decoupled stage k this tick."""
        self._restore_inflight(inflight or {})
        self.update_prob = float(config.update_prob)
        self._coin_keys = (
            [jax.device_put(key, d) for d in devices] if self.update_prob != 1.0 else None
        )
        """The batch key on every stage's device, for the coins (``Coins``); None at p = 1."""
        self._window = DispatchWindow(max_ticks_in_flight)
        self._compiler = StageCompiler()
        self._calls: list[StageCalls] = []
        self._output_call: jax.stages.Compiled | None = None

    def _tick_after(self, batches: int) -> int:
        """The next tick once the last group has trained on ``batches`` minibatches."""
        if batches == 0:
            return 0
        return batches + len(self.hidden) + (batches == self.config.num_steps)

    # ------------------------------------------------------------------ in-flight state

    def inflight(self) -> dict[str, jax.Array]:
        """The minibatches in flight, by name: FIFO entries, arriving activations and targets."""
        out: dict[str, jax.Array] = {}
        for k, fifo in enumerate(self._fifo):
            for n, acts in enumerate(fifo):
                out[f"fifo_{k}_{n}_h"], out[f"fifo_{k}_{n}_labels"] = acts
        for k, acts in self._inbox.items():
            out[f"inbox_{k}_h"], out[f"inbox_{k}_labels"] = acts
        for k, target in self._targets.items():
            out[f"target_{k}"] = target
        return out

    def _restore_inflight(self, inflight: Mapping[str, jax.Array]) -> None:
        def put(name: str, k: int) -> jax.Array:
            return jax.device_put(inflight[name], self.devices[k])

        fifo_sizes: dict[int, int] = collections.Counter()
        for name in inflight:
            kind, k, *rest = name.split("_")
            k = int(k)
            if kind == "fifo" and rest[-1] == "h":
                fifo_sizes[k] += 1
            elif kind == "inbox" and rest == ["h"]:
                self._inbox[k] = Activations(put(name, k), put(f"inbox_{k}_labels", k))
            elif kind == "target":
                self._targets[k] = put(name, k)
        for k, size in fifo_sizes.items():
            self._fifo[k].extend(
                Activations(put(f"fifo_{k}_{n}_h", k), put(f"fifo_{k}_{n}_labels", k))
                for n in range(size)
            )

    # ------------------------------------------------------------------ compile and run

    def _example_activations(self) -> list[Activations]:
        """Shapes of what each decoupled group sends on."""
        batch = jax.eval_shape(
            lambda d, c: sample_batch(c.key, d, self.config.batch_size), self.data, self._cursor
        )
        return [Activations(h, batch.labels) for h in self.trainer.boundary_shapes(batch.images)]

    def _coins(self, k: int) -> Coins | None:
        """Stage ``k``'s coins at this tick (None at p = 1)."""
        if self._coin_keys is None:
            return None
        tick = jax.device_put(jnp.int32(self.tick), self.devices[k])
        return Coins(self._coin_keys[k], tick)

    def compile(self) -> None:
        """Compile each stage's tick functions on its device (local methods, which have no
        targets, only the fill form: it is their steady tick too)."""
        trainer, compile_ = self.trainer, self._compiler
        shapes = self._example_activations()
        self._calls = []
        p = self.update_prob
        for j, (group, device) in enumerate(zip(self.hidden, self.devices, strict=False)):
            tick = functools.partial(hidden_tick, trainer=trainer, j=j, update_prob=p)
            state = abstract_on(group, device)
            acts = abstract_on(shapes[j], device)
            inputs = None if j == 0 else abstract_on(shapes[j - 1], device)
            coins = None if self._coin_keys is None else abstract_on(self._coins(j), device)
            if j == 0:
                first = functools.partial(
                    first_stage_tick,
                    trainer=trainer,
                    batch_size=self.config.batch_size,
                    update_prob=p,
                )
                data, cursor = abstract_on(self.data, device), abstract_on(self._cursor, device)
                fill = compile_("0/fill", device, first, state, data, cursor, None, None, coins)
                if trainer.local:
                    calls = StageCalls(fill, fill, fill)
                else:
                    calls = StageCalls(
                        fill=fill,
                        steady=compile_(
                            "0/steady", device, first, state, data, cursor, acts, acts.h, coins
                        ),
                        drain=compile_("0/drain", device, tick, state, None, acts, acts.h, coins),
                    )
            else:
                fill = compile_(f"{j}/fill", device, tick, state, inputs, None, None, coins)
                if trainer.local:
                    calls = StageCalls(fill, fill, fill)
                else:
                    calls = StageCalls(
                        fill=fill,
                        steady=compile_(
                            f"{j}/steady", device, tick, state, inputs, acts, acts.h, coins
                        ),
                        drain=compile_(
                            f"{j}/drain", device, tick, state, None, acts, acts.h, coins
                        ),
                    )
            self._calls.append(calls)
        device = self.devices[-1]
        self._output_call = compile_(
            "output",
            device,
            functools.partial(output_tick, trainer=trainer, update_prob=p),
            abstract_on(self.output, device),
            abstract_on(shapes[-1], device),
            None if self._coin_keys is None else abstract_on(self._coins(len(self.hidden)), device),
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
            coins = self._coins(k) if has_input or target is not None else None
            if has_input and k == 0:
                first = call(self.hidden[k], self.data, self._cursor, stored, target, coins)
                self._cursor, out = first.cursor, first.tick
            elif has_input:
                out = call(self.hidden[k], self._inbox[k], stored, target, coins)
            elif target is not None:
                out = calls.drain(self.hidden[k], None, stored, target, coins)
            else:
                continue
            self.hidden[k] = out.group
            # Something the tick wrote (a local method's boundary may hold nothing).
            dispatched.append(
                out.group.stages[-1].opt_state
                if self.trainer.local
                else out.group.synthesizer.opt_state
            )
            if out.sent is not None:
                if not self.trainer.local:  # local methods get no targets to match
                    self._fifo[k].append(out.sent)
                inbox[k + 1] = jax.device_put(out.sent, self.devices[k + 1])
            if out.message is not None:
                targets[k - 1] = jax.device_put(out.message, self.devices[k - 1])
            if out.sg_loss is not None:
                window.sg_loss[k].append(out.sg_loss)
        if 0 <= t - num_hidden < num_batches:
            out = self._output_call(self.output, self._inbox[num_hidden], self._coins(num_hidden))
            self.output = out.stages
            if not self.trainer.local:
                targets[num_hidden - 1] = jax.device_put(out.message, self.devices[num_hidden - 1])
            window.loss.append(out.loss)
            window.accuracy.append(out.accuracy)
            dispatched.append(out.loss)
        self._inbox, self._targets = inbox, targets
        self.tick += 1
        self._window.push(dispatched)

    def advance(self, batches: int) -> WindowMetrics:
        """Run ticks until the last group has trained on ``batches`` minibatches; for the run's
        last minibatch also the drain ticks, after which every module has had its N updates."""
        window = WindowMetrics([], [], tuple([] for _ in self.hidden))
        while self.tick < self._tick_after(batches):
            self._run_tick(window)
        return window

    def block_until_ready(self) -> None:
        jax.block_until_ready((self.hidden, self.output))

    def model_state(self, device: jax.Device) -> TrainerState:
        stages = tuple(s for group in self.hidden for s in group.stages) + tuple(self.output)
        synthesizers = tuple(group.synthesizer for group in self.hidden)
        return jax.device_put(TrainerState(stages, synthesizers), device)

    def state_devices(self) -> tuple[int, ...]:
        return tuple(device_id_of(stage) for stage in [*self.hidden, self.output])

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's steady-state tick, timed alone on its device (zeros as messages)."""
        shapes = self._example_activations()

        def zeros(acts: Activations, device: jax.Device) -> Activations:
            return Activations(*(zeros_on(a.shape, a.dtype, device) for a in acts))

        def messages(acts: Activations) -> tuple:
            """What a steady tick gets besides its input: a stored output and a target (none
            for local methods)."""
            return (None, None) if self.trainer.local else (acts, acts.h)

        times = []
        for k, (calls, device) in enumerate(zip(self._calls, self.devices, strict=False)):
            acts = zeros(shapes[k], device)
            coins, extra = self._coins(k), messages(acts)
            if k == 0:
                start = FirstStageTick(HiddenTick(self.hidden[0], None, None, None), self._cursor)
                times.append(
                    time_chain(
                        lambda s, c=calls, m=extra, w=coins: c.steady(
                            s.tick.group, self.data, s.cursor, *m, w
                        ),
                        start,
                        repeats,
                    )
                )
            else:
                inputs = zeros(shapes[k - 1], device)
                times.append(
                    time_chain(
                        lambda s, c=calls, i=inputs, m=extra, w=coins: c.steady(s, i, *m, w).group,
                        self.hidden[k],
                        repeats,
                    )
                )
        device = self.devices[-1]
        acts = zeros(shapes[-1], device)
        coins = self._coins(len(self.hidden))
        times.append(
            time_chain(lambda s: self._output_call(s, acts, coins).stages, self.output, repeats)
        )
        return tuple(times)

"""Layer-parallel complete unlock: every group of the ``Trainer`` on its own device, all of them
on the same minibatch at once (Jaderberg et al. 2016, section 3.1; ``--synthetic_inputs``).

Pipeline stages are the ``Trainer``'s groups j = 0..L (the decoupled groups, each with its
synthesizer M_j, then the last group). Group j > 0 also holds I_{j-1}, the synthetic-input model
that predicts its input from the network's input, so no group waits for the one below: at tick t
every stage works on minibatch t, which every device draws itself from its own copy of the data
(``sample_batch(fold_in(key, t), ...)``, the single-device loop's draw for step t). Stage j's tick:

1. regressions on minibatch t-1, from the messages of tick t-1: M_j towards the gradient stage
   j+1 sent down (on its stored output o_j^{t-1}), and I_{j-1} onto the output o_{j-1}^{t-1}
   stage j-1 sent up (``Trainer.synthesizer_gradients``, ``Trainer.input_model_update``);
2. then minibatch t, with the parameters step 1 left: input s_j = I_{j-1}(x_t) (x_t for group 0),
   output o_j^t = f_j(s_j), update with g_j = M_j(o_j^t) (the last group: with its true loss);
   sends o_j^t up and dLoss/ds_j (the VJP of g_j, or of the loss) down.

Every message is used one tick after it is sent, so stages never wait for each other within a
tick. Because each stage does step 1 before step 2, every update starts from the parameter
versions ``Trainer.step`` starts from: minibatch t is trained with M^(t) and I^(t) (t updates
each), M_j and I_{j-1} regress on minibatch t from those same versions one tick later. The
pipeline therefore computes exactly the synchronous complete-unlock steps (tests/test_parallel.py
checks it). N minibatches take N + 1 ticks (the last one only regresses).

With --update_prob=p each stage keeps its tick-t update of minibatch t only if the coin the
single-device loop draws for its group at step t comes up (``Trainer.group_coin``), and its
regressions on minibatch t-1 only if step t-1's coin did, as ``Trainer.step`` keeps or drops a
group with its synthesizer and the synthetic-input model below it.

The messages of the last tick (o_j, the targets, each stage's stored output) are the pipeline's
state in flight: ``inflight()`` names them, and a pipeline built with them continues exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.trainer import StageState, Trainer, TrainerState
from sgjax.data.device import DeviceData, sample_batch
from sgjax.parallel.stages import (
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


class UnlockedStage(NamedTuple):
    """A group on its device: its stages, its synthesizer (None for the last group) and the
    synthetic-input model predicting its input (None for the first group)."""

    stages: tuple[StageState, ...]
    synthesizer: StageState | None
    input_model: StageState | None


class Messages(NamedTuple):
    """What a stage's tick reads from the previous tick (None where there is none)."""

    below: jax.Array | None
    """o_{j-1}^{t-1}, sent up by the stage below: I_{j-1}'s regression target."""
    stored: jax.Array | None
    """o_j^{t-1}, this stage's own output of the previous tick (M_j's input)."""
    target: jax.Array | None
    """The gradient at stage j+1's input on minibatch t-1: M_j's regression target."""


class UnlockedTick(NamedTuple):
    """A stage's tick: its new state, what it sends and its losses (None where none)."""

    stage: UnlockedStage
    output: jax.Array | None
    """o_j^t, for stage j+1's input model and this stage's next tick (None for the last)."""
    message: jax.Array | None
    """The gradient at this stage's input: M_{j-1}'s target (None for the first stage)."""
    sg_loss: jax.Array | None
    input_loss: jax.Array | None
    loss: jax.Array | None
    accuracy: jax.Array | None
    next_tick: jax.Array
    """The tick after this one, on the stage's device (the host never sends it)."""


class TickPlan(NamedTuple):
    """What is static about a stage's tick (one compiled function per plan)."""

    forward: bool
    """Whether the stage trains on minibatch t (False on the drain tick)."""
    regress: bool
    """Whether the stage regresses on minibatch t-1 (False on tick 0)."""


class Regressed(NamedTuple):
    """A stage after its regressions on minibatch t-1, and their losses (None where none)."""

    stage: UnlockedStage
    sg_loss: jax.Array | None
    input_loss: jax.Array | None


class Trained(NamedTuple):
    """A stage after its update on minibatch t, what it sends and its losses (None where
    none)."""

    stage: UnlockedStage
    output: jax.Array | None
    message: jax.Array | None
    loss: jax.Array | None
    accuracy: jax.Array | None


def _batch(key: jax.Array, data: DeviceData, index: jax.Array, batch_size: int) -> Any:
    return sample_batch(jax.random.fold_in(key, index), data, batch_size)


def _coin(
    trainer: Trainer, key: jax.Array, index: jax.Array, j: int, update_prob: float
) -> jax.Array | None:
    return trainer.group_coin(key, index, j, update_prob) if update_prob != 1.0 else None


def unlocked_regress(
    stage: UnlockedStage,
    data: DeviceData,
    key: jax.Array,
    tick: jax.Array,
    messages: Messages,
    *,
    trainer: Trainer,
    j: int,
    batch_size: int,
    update_prob: float = 1.0,
) -> Regressed:
    """Step 1 of stage ``j``'s tick ``tick``: M_j and I_{j-1} regress on minibatch tick-1."""
    last = j == len(trainer.groups) - 1
    synthesizer, input_model = stage.synthesizer, stage.input_model
    sg_loss = input_loss = None
    previous = _batch(key, data, tick - 1, batch_size)
    learn = _coin(trainer, key, tick - 1, j, update_prob)
    if j > 0:
        learnt, input_loss = trainer.input_model_update(
            input_model, previous.images, messages.below
        )
        input_model = kept(learn, learnt, input_model)
    if not last:
        regression = trainer.synthesizer_gradients(
            synthesizer, messages.stored, previous.labels, messages.target
        )
        learnt = trainer.update_synthesizer(synthesizer, regression.grads, synthesizer.collections)
        synthesizer, sg_loss = kept(learn, learnt, synthesizer), regression.sg_loss
    return Regressed(UnlockedStage(stage.stages, synthesizer, input_model), sg_loss, input_loss)


def unlocked_forward(
    stage: UnlockedStage,
    data: DeviceData,
    key: jax.Array,
    tick: jax.Array,
    *,
    trainer: Trainer,
    j: int,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_prob: float = 1.0,
) -> Trained:
    """Step 2 of stage ``j``'s tick ``tick``: its update on minibatch ``tick``, with the
    parameters step 1 left."""
    last = j == len(trainer.groups) - 1
    synthesizer, stages = stage.synthesizer, stage.stages
    current = _batch(key, data, tick, batch_size)
    update = _coin(trainer, key, tick, j, update_prob)
    output = loss = accuracy = None
    h = current.images
    if j > 0:
        h = jax.lax.stop_gradient(trainer.predicted_input(stage.input_model, h, input_shape))
    indexed = indexed_group(trainer, j, stages)
    if last:
        grads = trainer.last_group_gradients(indexed, h, current.labels)
        new = trainer.update_stages(indexed, trainer.groups[j], grads.stages, grads.collections)
        loss, accuracy = grads.loss, trainer.accuracy(grads.output, current.labels)
    else:
        fwd = trainer.group_forward(indexed, synthesizer, j, h, current.labels)
        # The synthesizer half of group_backward (against a dummy target) is dropped by the
        # compiler: M_j learns from the target that arrives next tick.
        grads = trainer.group_backward(fwd, fwd.synthetic_grad)
        new = trainer.update_stages(indexed, trainer.groups[j], grads.stages, fwd.collections)
        synthesizer = synthesizer._replace(
            collections=kept(update, fwd.synthesizer_collections, synthesizer.collections)
        )
        output = fwd.output
    stages = kept(update, tuple(new[k] for k in trainer.groups[j]), stages)
    return Trained(
        UnlockedStage(stages, synthesizer, stage.input_model),
        output,
        grads.input_grad,
        loss,
        accuracy,
    )


def unlocked_tick(
    stage: UnlockedStage,
    data: DeviceData,
    key: jax.Array,
    tick: jax.Array,
    messages: Messages,
    *,
    trainer: Trainer,
    j: int,
    plan: TickPlan,
    batch_size: int,
    input_shape: tuple[int, ...],
    update_prob: float = 1.0,
) -> UnlockedTick:
    """Stage ``j``'s tick ``tick``: regressions on minibatch tick-1, then its update on
    minibatch ``tick`` (see the module docstring)."""
    common = dict(trainer=trainer, j=j, batch_size=batch_size, update_prob=update_prob)
    sg_loss = input_loss = None
    if plan.regress:
        stage, sg_loss, input_loss = unlocked_regress(stage, data, key, tick, messages, **common)
    output = message = loss = accuracy = None
    if plan.forward:
        stage, output, message, loss, accuracy = unlocked_forward(
            stage, data, key, tick, input_shape=input_shape, **common
        )
    return UnlockedTick(stage, output, message, sg_loss, input_loss, loss, accuracy, tick + 1)


def split_unlocked(trainer: Trainer, model: TrainerState) -> list[UnlockedStage]:
    """Each group's stage states with its synthesizer and the input model below it."""
    num = len(trainer.groups)
    return [
        UnlockedStage(
            tuple(model.stages[k] for k in trainer.groups[j]),
            model.synthesizers[j] if j < num - 1 else None,
            model.inputs[j - 1] if j > 0 else None,
        )
        for j in range(num)
    ]


class UnlockedPipeline:
    """The complete unlock over ``devices`` (one per group); a ``Pipeline``.

    ``step`` > 0 continues a pipeline that had trained on ``step`` minibatches when it gave
    ``model`` and ``inflight`` (``UnlockedPipeline.inflight``).
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
        if not trainer.unlocked:
            raise ValueError("the complete-unlock pipeline needs DNI with synthetic inputs")
        self.trainer = trainer
        self.config = config
        self.devices = devices
        self.num_stages = len(trainer.groups)
        self.stages = [
            jax.device_put(s, d)
            for s, d in zip(split_unlocked(trainer, model), devices, strict=True)
        ]
        copies = {d.id: jax.device_put(data, d) for d in devices}
        self.data = [copies[d.id] for d in devices]
        """Every stage draws its minibatches itself, from the data on its own device."""
        self.keys = [jax.device_put(key, d) for d in devices]
        self.tick = self._tick_after(step)
        self._ticks = [jax.device_put(jnp.int32(self.tick), d) for d in devices]
        """The tick on every stage's device; each tick's call returns the next one."""
        self._messages = self._restore_inflight(inflight or {})
        self.update_prob = float(config.update_prob)
        batch = jax.eval_shape(
            lambda d, k: sample_batch(k, d, config.batch_size), self.data[0], self.keys[0]
        )
        self._shapes = trainer.boundary_shapes(batch.images)
        """The shape of every decoupled group's output (the next group's input)."""
        self._window = DispatchWindow(max_ticks_in_flight)
        self._compiler = StageCompiler()
        self._calls: dict[tuple[int, TickPlan], jax.stages.Compiled] = {}

    def _tick_after(self, batches: int) -> int:
        """The next tick once every stage has trained on ``batches`` minibatches (the run's
        last minibatch also has its regressions done)."""
        return batches + (batches == self.config.num_steps and batches > 0)

    # ------------------------------------------------------------------ in-flight state

    def inflight(self) -> dict[str, jax.Array]:
        """The previous tick's messages by name: ``below_j``, ``stored_j``, ``target_j``."""
        out: dict[str, jax.Array] = {}
        for j, messages in enumerate(self._messages):
            for name, value in messages._asdict().items():
                if value is not None:
                    out[f"{name}_{j}"] = value
        return out

    def _restore_inflight(self, inflight: Mapping[str, jax.Array]) -> list[Messages]:
        def get(name: str, j: int) -> jax.Array | None:
            value = inflight.get(f"{name}_{j}")
            return None if value is None else jax.device_put(value, self.devices[j])

        return [
            Messages(*(get(name, j) for name in Messages._fields)) for j in range(self.num_stages)
        ]

    # ------------------------------------------------------------------ compile and run

    def _example_messages(self, j: int, plan: TickPlan) -> Messages:
        """Shapes of stage ``j``'s messages under ``plan`` (None where it reads none)."""
        if not plan.regress:
            return Messages(None, None, None)
        last = j == self.num_stages - 1
        below = self._shapes[j - 1] if j > 0 else None
        own = None if last else self._shapes[j]
        return Messages(below, own, own)

    def _function(self, j: int, plan: TickPlan) -> Any:
        shape = tuple(self._shapes[j - 1].shape[1:]) if j > 0 else ()
        return functools.partial(
            unlocked_tick,
            trainer=self.trainer,
            j=j,
            plan=plan,
            batch_size=self.config.batch_size,
            input_shape=shape,
            update_prob=self.update_prob,
        )

    def _call(self, j: int, plan: TickPlan) -> jax.stages.Compiled:
        """Stage ``j``'s compiled tick under ``plan`` (compiled on first use)."""
        if (j, plan) not in self._calls:
            device = self.devices[j]
            self._calls[(j, plan)] = self._compiler(
                f"{j}/{int(plan.forward)}{int(plan.regress)}",
                device,
                self._function(j, plan),
                abstract_on(self.stages[j], device),
                abstract_on(self.data[j], device),
                abstract_on(self.keys[j], device),
                abstract_on(self._ticks[j], device),
                abstract_on(self._example_messages(j, plan), device),
            )
        return self._calls[(j, plan)]

    def compile(self) -> None:
        """Compile every stage's fill (tick 0), steady and drain ticks on its device."""
        plans = [TickPlan(True, True), TickPlan(False, True)]
        if self.tick == 0:
            plans.append(TickPlan(True, False))
        for j in range(self.num_stages):
            for plan in plans:
                self._call(j, plan)

    def _run_tick(self, window: WindowMetrics) -> None:
        t = self.tick
        plan = TickPlan(forward=t < self.config.num_steps, regress=t > 0)
        ticks = [
            self._call(j, plan)(
                self.stages[j],
                self.data[j],
                self.keys[j],
                self._ticks[j],
                self._messages[j] if plan.regress else Messages(None, None, None),
            )
            for j in range(self.num_stages)
        ]
        messages = []
        for j, out in enumerate(ticks):
            self.stages[j], self._ticks[j] = out.stage, out.next_tick
            below = ticks[j - 1].output if j > 0 else None
            above = ticks[j + 1].message if j < self.num_stages - 1 else None
            messages.append(
                Messages(
                    None if below is None else jax.device_put(below, self.devices[j]),
                    out.output,
                    None if above is None else jax.device_put(above, self.devices[j]),
                )
            )
            if out.sg_loss is not None:
                window.sg_loss[j].append(out.sg_loss)
            if out.input_loss is not None:
                window.input_loss[j - 1].append(out.input_loss)
        if plan.forward:
            window.loss.append(ticks[-1].loss)
            window.accuracy.append(ticks[-1].accuracy)
        self._messages = messages
        self.tick += 1
        self._window.push([jax.tree_util.tree_leaves(out.stage)[0] for out in ticks])

    def advance(self, batches: int) -> WindowMetrics:
        """Run ticks until every stage has trained on ``batches`` minibatches; for the run's
        last minibatch also the drain tick (its regressions)."""
        num = self.num_stages - 1
        window = WindowMetrics([], [], tuple([] for _ in range(num)), tuple([] for _ in range(num)))
        while self.tick < self._tick_after(batches):
            self._run_tick(window)
        return window

    def block_until_ready(self) -> None:
        jax.block_until_ready(self.stages)

    def model_state(self, device: jax.Device) -> TrainerState:
        stages = tuple(s for stage in self.stages for s in stage.stages)
        synthesizers = tuple(stage.synthesizer for stage in self.stages[:-1])
        inputs = tuple(stage.input_model for stage in self.stages[1:])
        return jax.device_put(TrainerState(stages, synthesizers, inputs), device)

    def state_devices(self) -> tuple[int, ...]:
        return tuple(device_id_of(stage) for stage in self.stages)

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's steady tick, timed alone on its device (zeros as messages)."""
        plan = TickPlan(True, True)
        times = []
        for j, device in enumerate(self.devices):
            example = self._example_messages(j, plan)
            messages = Messages(
                *(None if m is None else zeros_on(m.shape, m.dtype, device) for m in example)
            )
            call, tick = self._call(j, plan), self._ticks[j]
            data, key = self.data[j], self.keys[j]
            times.append(
                time_chain(
                    lambda s, c=call, d=data, k=key, i=tick, m=messages: c(s, d, k, i, m).stage,
                    self.stages[j],
                    repeats,
                )
            )
        return tuple(times)

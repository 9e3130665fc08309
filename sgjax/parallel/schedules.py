"""The layer-parallel schedules, each written once, as the per-device program of one SPMD chunk.

A program runs under ``jax.shard_map`` on every device of a one-axis mesh (``STAGE_AXIS``); each
pipeline stage is owned by one device (``owner``; several stages may share one) and every tick
each device runs the stages it owns (``run_own_stages``), then messages move one stage up and
one stage down (``shifted``: a ``lax.ppermute`` where they cross devices). The same program runs
on every device of every process, so it spans hosts (``jax.distributed``).

* ``SgProgram`` (DNI/cDNI, greedy local learning, zero gradient; any --update_prob): stage k
  works on minibatch t - k at tick t; it trains its group with its synthesizer's gradient and
  sends h_k up and the VJP of its input down; a target arrives two ticks after its output,
  matched to it by a two-slot FIFO indexed by tick parity, and the synthesizer regresses on the
  stored output with its current parameters. N minibatches take N + K ticks (fill and drain are
  the ticks where a stage has no input or no target). For minibatch b every group computes its
  forward with the parameters of synchronous sg; the synthetic gradients (for the update and
  the bootstrapped targets) come from modules two updates old (tests/test_parallel.py checks
  the pipeline against synchronous sg with a lagged module copy). Local methods have no targets:
  each group learns on the tick of its input, so the pipeline is the synchronous steps exactly.
  With --update_prob the coins are ``Trainer.group_coin`` for minibatch b, as the single-device
  loop draws them.
* ``UnlockedProgram`` (the complete unlock, Jaderberg et al. 2016 section 3.1): every stage works
  on minibatch t at tick t, each device drawing it itself; it first regresses its synthesizer
  and the input model below it on minibatch t-1 (from the previous tick's messages), then
  trains on minibatch t with the parameters that left, so every update starts from the versions
  ``Trainer.step`` starts from: the synchronous steps exactly. N minibatches take N + 1 ticks.
* ``BpProgram`` (model-parallel backprop, M = 1, and GPipe): per minibatch, one ``lax.scan`` of
  M + 2(K - 1) ticks: stage k runs microbatch m forward at tick m + k, keeping its input, and
  backward at tick m + 2(K - 1) - k (its forward recomputed from that input, then its VJP, whose
  input cotangent goes one stage down), adding only its own gradients (the last stage does both
  on one tick). Every stage then updates with the mean of its microbatches' gradients. BatchNorm
  normalises per microbatch and its running statistics are updated once per microbatch, in
  order, as ``accumulated_backprop_step`` does on one device.

Every device keeps a slot for every stage's state (a leading device axis on the global arrays)
and reads and writes only its own (one ``lax.cond`` per stage, which XLA runs in place). Messages
are padded to the widest boundary. A program runs a fixed number of ticks and a traced stop tick
turns the surplus into no-ops, so a run compiles one program for all of its chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgjax.core.layers import apply_module
from sgjax.core.trainer import StageState, StepMetrics, Trainer, TrainerState
from sgjax.parallel.stages import (
    STAGE_AXIS,
    by_slot,
    indexed_group,
    kept,
    pad_rows,
    run_own_stages,
    shifted,
    slots,
    unpad_rows,
    with_labels,
    without_labels,
)


class Schedule(NamedTuple):
    """The schedule's parameters (not the network's: those are the ``Trainer``'s)."""

    kind: str
    """``sg_pipeline`` (every decoupled method), ``bp_model_parallel`` or ``bp_gpipe``."""
    num_steps: int
    batch_size: int
    update_prob: float = 1.0
    microbatches: int = 1
    chunk_steps: int = 1000


class BatchSource(NamedTuple):
    """Where minibatches come from: ``data`` (a pytree of arrays, copied to every device) and
    two pure functions of it."""

    data: Any
    sample: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    """``(data, key, index) -> (inputs, labels)``: minibatch ``index`` of the run with batch key
    ``key`` (the single-device loop's draw for step ``index``)."""
    test: Callable[[Any], tuple[jax.Array, jax.Array]]
    """``data -> (inputs, labels)`` for evaluation."""


class PipeStage(NamedTuple):
    """A pipeline stage's state: its chain stages, the boundary module above it (synthesizer,
    DGL head; None for the last group and for backprop) and the complete unlock's synthetic-input
    model predicting its input (None elsewhere)."""

    stages: tuple[StageState, ...]
    boundary: StageState | None = None
    input_model: StageState | None = None


class TickMetrics(NamedTuple):
    """Per tick (leading axis); per stage on the second axis where named so."""

    loss: jax.Array
    accuracy: jax.Array
    loss_valid: jax.Array
    aux_loss: jax.Array
    """The boundary module's regression loss (DGL: its head's loss)."""
    aux_valid: jax.Array
    input_loss: jax.Array


class Sends(NamedTuple):
    """What a stage's tick sends up and down (padded) and reports."""

    up: jax.Array
    down: jax.Array
    store: jax.Array
    """sg: whether ``up`` goes into the stage's FIFO (it had an input)."""
    metrics: TickMetrics
    """The stage's own (scalars)."""


def tick_metrics(sends: Sequence[Sends]) -> TickMetrics:
    """One tick's metrics: the last stage's loss and accuracy, the others' per stage."""
    last = sends[-1].metrics
    per_stage = [jnp.stack(m) for m in zip(*(s.metrics[3:] for s in sends), strict=True)]
    return TickMetrics(*last[:3], *per_stage)


def gathered(metrics: TickMetrics) -> TickMetrics:
    """A chunk's metrics the same on every device: each value is computed by one device and
    zero on the others, so a sum over the axis is exact (once per chunk, not per tick)."""

    def total(m: jax.Array) -> jax.Array:
        if m.dtype == bool:
            return lax.psum(m.astype(jnp.int32), STAGE_AXIS) > 0
        return lax.psum(m, STAGE_AXIS)

    return TickMetrics(*(total(m) for m in metrics))


def local_states(states: Any) -> Any:
    """Inside the program: the device's slots (the device axis dropped)."""
    return jax.tree_util.tree_map(lambda x: x[0], states)


def global_states(states: Any) -> Any:
    """Out of the program: the device axis put back."""
    return jax.tree_util.tree_map(lambda x: x[None], states)


class Program:
    """What every schedule's program shares: stages, shapes, coins, state layout, evaluation."""

    surplus = 0
    """Ticks a chunk may need beyond its minibatches (fill and drain)."""
    steady_tick = 0
    """A tick at which every stage does its whole work (for timing a stage alone)."""
    mail_fields: dict[str, tuple[tuple[int, ...], Any]] = {}

    def __init__(self, trainer: Trainer, schedule: Schedule, batches: BatchSource):
        self.trainer, self.schedule, self.batches = trainer, schedule, batches
        x, _ = jax.eval_shape(
            lambda d: batches.sample(d, jax.random.PRNGKey(0), jnp.int32(0)), batches.data
        )
        self.input_shape = tuple(x.shape)
        self.members: list[tuple[int, ...]] = list(trainer.groups)

    @property
    def num_stages(self) -> int:
        return len(self.members)

    def _set_shapes(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = [tuple(s) for s in shapes]
        """Each stage's output shape (the last stage's excluded)."""
        self.width = max([math.prod(s[1:]) for s in self.shapes] or [1])

    def split(self, model: TrainerState) -> list[PipeStage]:
        num = self.num_stages
        return [
            PipeStage(
                tuple(model.stages[i] for i in members),
                model.synthesizers[j] if j < len(model.synthesizers) else None,
                model.inputs[j - 1] if 0 < j <= len(model.inputs) else None,
            )
            for j, members in enumerate(self.members[:num])
        ]

    def join(self, states: Sequence[PipeStage]) -> TrainerState:
        return TrainerState(
            tuple(s for state in states for s in state.stages),
            tuple(s.boundary for s in states if s.boundary is not None),
            tuple(s.input_model for s in states if s.input_model is not None),
        )

    def coin(self, key: jax.Array, index: jax.Array, j: int) -> jax.Array | None:
        """Whether group ``j`` updates on minibatch ``index`` (None at --update_prob=1)."""
        p = self.schedule.update_prob
        return None if p == 1.0 else self.trainer.group_coin(key, index, j, p)

    def sample(self, data: Any, key: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.batches.sample(data, key, index)

    def stage_eval(self, k: int, state: PipeStage, h: jax.Array) -> jax.Array:
        """Pipeline stage ``k`` in evaluation mode."""
        for i, s in zip(self.members[k], state.stages, strict=True):
            h, _ = apply_module(self.trainer.stages[i], s.params, s.collections, h, train=False)
        return h

    def tick_after(self, batches: int) -> int:
        """The next tick once the last stage has trained on ``batches`` minibatches."""
        return batches

    def chunk_fn(self, ticks: int, owner: Sequence[int], only: int | None = None) -> Callable:
        """The per-device program ``(states, mail, data, key, t0, stop) -> (states, mail,
        metrics)`` for ``ticks`` ticks from ``t0``, those at ``stop`` or after doing nothing."""
        raise NotImplementedError


class DecoupledProgram(Program):
    """A pipeline of the ``Trainer``'s groups that runs one tick at a time (sg and unlock)."""

    def __init__(self, trainer: Trainer, schedule: Schedule, batches: BatchSource):
        super().__init__(trainer, schedule, batches)
        x = jax.ShapeDtypeStruct(self.input_shape, jnp.float32)
        self._set_shapes([h.shape for h in trainer.boundary_shapes(x)])

    def _zeros(self, extra: int = 0) -> jax.Array:
        return jnp.zeros((self.schedule.batch_size, self.width + extra), jnp.float32)

    def _branch(self, k: int) -> Callable:
        raise NotImplementedError

    def _deliver(self, mail: Any, sends: list[Sends], me: jax.Array, owner, t) -> Any:
        raise NotImplementedError

    def chunk_fn(self, ticks: int, owner: Sequence[int], only: int | None = None) -> Callable:
        branches = [self._branch(k) for k in range(self.num_stages)]
        mail_type, slot = self.mail_type, slots(owner)

        def program(states, mail, data, key, t0, stop):
            states, mail = local_states(states), mail_type(*(m[0] for m in mail))
            me = lax.axis_index(STAGE_AXIS)

            def tick(carry, i):
                states, mail = carry
                t = t0 + i
                own = [mail_type(*(m[slot[k]] for m in mail)) for k in range(len(branches))]
                args = (states, t, stop, data, key)
                new, sends = run_own_stages(me, owner, branches, *args, extras=own, only=only)
                received = self._deliver(mail, sends, me, owner, t)
                mail = kept(t < stop, received, mail)
                return (new, mail), tick_metrics(sends)

            (states, mail), metrics = lax.scan(tick, (states, mail), jnp.arange(ticks))
            return global_states(states), global_states(mail), gathered(metrics)

        return program


# --------------------------------------------------------------------------- DNI pipeline


class SgMail(NamedTuple):
    """A device's mailboxes, per own stage (``slots``): [slots, ...]; one stage's as below."""

    inbox: jax.Array
    """Activations (with their labels, ``with_labels``) from the stage below: [B, F+1]."""
    target: jax.Array
    """The synthesizer's target from the stage above: [B, F]."""
    fifo: jax.Array
    """The stage's last two outputs (with labels), slot ``tick % 2``: [2, B, F+1]."""


class SgProgram(DecoupledProgram):
    """The decoupled pipeline (DNI, cDNI, greedy local learning, zero gradient)."""

    mail_type = SgMail

    def __init__(self, trainer: Trainer, schedule: Schedule, batches: BatchSource):
        super().__init__(trainer, schedule, batches)
        b, f = schedule.batch_size, self.width
        self.mail_fields = dict(
            inbox=((b, f + 1), np.float32),
            target=((b, f), np.float32),
            fifo=((2, b, f + 1), np.float32),
        )
        self.surplus = self.num_stages
        self.steady_tick = self.num_stages + 1

    def tick_after(self, batches: int) -> int:
        if batches == 0:
            return 0
        return batches + self.num_stages - 1 + (batches == self.schedule.num_steps)

    def _local_update(self, stage: PipeStage, x: jax.Array, y: jax.Array, j: int) -> tuple:
        """A group that learns from what it computes itself (``Trainer.local``: greedy local
        learning, the zero gradient), by ``Trainer.step``'s forward and backward."""
        trainer = self.trainer
        indexed = indexed_group(trainer, j, stage.stages)
        fwd = trainer.group_forward(indexed, stage.boundary, j, jax.lax.stop_gradient(x), y)
        g = trainer.group_backward(fwd, None)
        head = trainer.update_synthesizer(stage.boundary, g.synthesizer, g.synthesizer_collections)
        new = trainer.update_stages(indexed, trainer.groups[j], g.stages, fwd.collections)
        return PipeStage(tuple(new[i] for i in trainer.groups[j]), head), fwd.output, g.sg_loss

    def _branch(self, k: int) -> Callable:
        trainer, n = self.trainer, self.schedule.num_steps
        last = k == self.num_stages - 1
        shape_in = self.input_shape if k == 0 else self.shapes[k - 1]
        shape_out = None if last else self.shapes[k]
        zero, no = jnp.zeros((), jnp.float32), jnp.zeros((), bool)

        def both(a: jax.Array | None, b: jax.Array) -> jax.Array:
            return b if a is None else a & b

        def branch(stage: PipeStage, mail: SgMail, t, stop, data, key):
            active = t < stop
            has_input = active & (t - k >= 0) & (t - k < n)
            has_target = active & (t - k - 2 >= 0) & (t - k - 2 < n)
            if trainer.local or last:
                has_target = no
            # When the boundary module learns: from a target (sg, cdni) or from the input (DGL).
            learns = has_input if trainer.local else has_target
            update = both(self.coin(key, t - k, k), has_input)
            learn = both(self.coin(key, t - k if trainer.local else t - k - 2, k), learns)

            def inputs() -> tuple[jax.Array, jax.Array]:
                if k == 0:
                    return self.sample(data, key, t)
                h, y = without_labels(mail.inbox)
                return unpad_rows(h, shape_in), y

            def work() -> tuple:
                x, y = inputs()
                indexed = indexed_group(trainer, k, stage.stages)
                if last:
                    g = trainer.last_group_gradients(indexed, x, y)
                    new = trainer.update_stages(indexed, trainer.groups[k], g.stages, g.collections)
                    stages = kept(update, tuple(new[i] for i in trainer.groups[k]), stage.stages)
                    accuracy = trainer.accuracy(g.output, y)
                    down = pad_rows(g.input_grad, self.width)
                    return stage._replace(stages=stages), self._zeros(1), down, g.loss, accuracy
                if trainer.local:
                    new, out, loss = self._local_update(stage, x, y, k)
                    up = with_labels(pad_rows(out, self.width), y)
                    return kept(update, new, stage), up, self._zeros(), zero, loss
                synth = stage.boundary
                fwd = trainer.group_forward(indexed, synth, k, x, y)
                # Only the group's half of group_backward is used (the synthesizer learns from
                # the target below); the other half is dropped by the compiler.
                grads = trainer.group_backward(fwd, fwd.synthetic_grad)
                new = trainer.update_stages(
                    indexed, trainer.groups[k], grads.stages, fwd.collections
                )
                stages = kept(update, tuple(new[i] for i in trainer.groups[k]), stage.stages)
                statistics = kept(update, fwd.synthesizer_collections, synth.collections)
                # The regression on the output of two ticks ago, with the current parameters.
                stored_h, stored_y = without_labels(mail.fifo[t % 2])
                target = unpad_rows(mail.target, shape_out)
                regression = trainer.synthesizer_gradients(
                    synth, unpad_rows(stored_h, shape_out), stored_y, target
                )
                learnt = trainer.update_synthesizer(synth, regression.grads, statistics)
                synth = kept(learn, learnt, synth._replace(collections=statistics))
                up = with_labels(pad_rows(fwd.output, self.width), y)
                down = self._zeros() if k == 0 else pad_rows(grads.input_grad, self.width)
                return PipeStage(stages, synth), up, down, zero, regression.loss

            def idle() -> tuple:
                return stage, self._zeros(1), self._zeros(), zero, zero

            new, up, down, loss, aux = lax.cond(has_input | has_target, work, idle)
            if last:
                return new, Sends(up, down, no, TickMetrics(loss, aux, has_input, zero, no, zero))
            aux = jnp.where(learns, aux, 0.0)
            return new, Sends(up, down, has_input, TickMetrics(zero, zero, no, aux, learns, zero))

        return branch

    def _deliver(self, mail: SgMail, sends: list[Sends], me, owner, t) -> SgMail:
        up, down, store = (by_slot(me, owner, [s[i] for s in sends]) for i in range(3))
        store = jnp.stack(store)[:, None, None]
        fifo = mail.fifo.at[:, t % 2].set(jnp.where(store, jnp.stack(up), mail.fifo[:, t % 2]))
        inbox = jnp.stack(shifted(me, owner, up, 1))
        target = jnp.stack(shifted(me, owner, down, -1))
        return SgMail(inbox, target, fifo)


# --------------------------------------------------------------------------- complete unlock


class UnlockedMail(NamedTuple):
    """The previous tick's messages (padded), per slot as ``SgMail``: [B, F]."""

    below: jax.Array
    """o_{j-1}^{t-1} from the stage below: the input model's target."""
    stored: jax.Array
    """The stage's own o_j^{t-1}: its synthesizer's input."""
    target: jax.Array
    """The gradient at stage j+1's input on minibatch t-1: the synthesizer's target."""


class UnlockedProgram(DecoupledProgram):
    """The complete unlock: every stage on minibatch t at tick t, its regressions on minibatch
    t-1 first, then its update, each under a ``lax.cond`` on the tick."""

    mail_type = UnlockedMail
    surplus = 1
    steady_tick = 1

    def __init__(self, trainer: Trainer, schedule: Schedule, batches: BatchSource):
        super().__init__(trainer, schedule, batches)
        shape = (schedule.batch_size, self.width)
        self.mail_fields = {name: (shape, np.float32) for name in UnlockedMail._fields}

    def tick_after(self, batches: int) -> int:
        return batches + (batches == self.schedule.num_steps and batches > 0)

    def _branch(self, j: int) -> Callable:
        trainer, n = self.trainer, self.schedule.num_steps
        last = j == self.num_stages - 1
        zero = jnp.zeros((), jnp.float32)

        def branch(stage: PipeStage, mail: UnlockedMail, t, stop, data, key):
            active = t < stop
            regress = active & (t > 0) & (t <= n)
            forward = active & (t < n)

            def regression(stage: PipeStage) -> tuple:
                x, y = self.sample(data, key, t - 1)
                learn = self.coin(key, t - 1, j)
                input_model, synth = stage.input_model, stage.boundary
                input_loss = sg_loss = zero
                if j > 0:
                    below = unpad_rows(mail.below, self.shapes[j - 1])
                    learnt, input_loss = trainer.input_model_update(input_model, x, below)
                    input_model = kept(learn, learnt, input_model)
                if not last:
                    stored = unpad_rows(mail.stored, self.shapes[j])
                    target = unpad_rows(mail.target, self.shapes[j])
                    regression = trainer.synthesizer_gradients(synth, stored, y, target)
                    learnt = trainer.update_synthesizer(synth, regression.grads, synth.collections)
                    synth, sg_loss = kept(learn, learnt, synth), regression.loss
                return PipeStage(stage.stages, synth, input_model), sg_loss, input_loss

            def train(stage: PipeStage) -> tuple:
                x, y = self.sample(data, key, t)
                update = self.coin(key, t, j)
                synth, h = stage.boundary, x
                if j > 0:
                    shape = self.shapes[j - 1][1:]
                    h = lax.stop_gradient(trainer.predicted_input(stage.input_model, x, shape))
                indexed = indexed_group(trainer, j, stage.stages)
                up = loss = accuracy = None
                if last:
                    grads = trainer.last_group_gradients(indexed, h, y)
                    collections = grads.collections
                    loss, accuracy = grads.loss, trainer.accuracy(grads.output, y)
                else:
                    fwd = trainer.group_forward(indexed, synth, j, h, y)
                    # The synthesizer learns from next tick's target (the other half of
                    # group_backward is dropped by the compiler).
                    grads = trainer.group_backward(fwd, fwd.synthetic_grad)
                    collections = fwd.collections
                    statistics = kept(update, fwd.synthesizer_collections, synth.collections)
                    synth, up = synth._replace(collections=statistics), fwd.output
                new = trainer.update_stages(indexed, trainer.groups[j], grads.stages, collections)
                stages = kept(update, tuple(new[i] for i in trainer.groups[j]), stage.stages)
                out = (
                    self._zeros() if up is None else pad_rows(up, self.width),
                    self._zeros() if j == 0 else pad_rows(grads.input_grad, self.width),
                    zero if loss is None else loss,
                    zero if accuracy is None else accuracy,
                )
                return PipeStage(stages, synth, stage.input_model), *out

            # The regressions first: the update reads the parameters they leave.
            stage, sg_loss, input_loss = lax.cond(
                regress, regression, lambda s: (s, zero, zero), stage
            )
            idle = (self._zeros(), self._zeros(), zero, zero)
            stage, up, down, loss, accuracy = lax.cond(forward, train, lambda s: (s, *idle), stage)
            valid = forward & last
            metrics = TickMetrics(loss, accuracy, valid, sg_loss, regress, input_loss)
            return stage, Sends(up, down, forward, metrics)

        return branch

    def _deliver(self, mail: UnlockedMail, sends: list[Sends], me, owner, t) -> UnlockedMail:
        up, down = (by_slot(me, owner, [s[i] for s in sends]) for i in range(2))
        shifts = shifted(me, owner, up, 1), up, shifted(me, owner, down, -1)
        return UnlockedMail(*(jnp.stack(m) for m in shifts))


# --------------------------------------------------------------------------- backprop


class BpProgram(Program):
    """Model-parallel (M = 1) and GPipe backprop: per minibatch, the forward and backward
    schedule in one scan of ticks, then every stage's update with its own summed gradients."""

    mail_type = tuple

    def __init__(self, trainer: Trainer, schedule: Schedule, batches: BatchSource):
        super().__init__(trainer, schedule, batches)
        self.members = [(k,) for k in range(len(trainer.stages))]
        micro = schedule.microbatches
        self.micro_shape = (schedule.batch_size // micro, *self.input_shape[1:])

        def outputs(x: jax.Array) -> list[jax.Array]:  # every stage's but the last's
            hs, stages = [x], trainer.init(jax.random.PRNGKey(0), x).stages
            for module, s in zip(trainer.stages[:-1], stages, strict=False):
                hs.append(apply_module(module, s.params, s.collections, hs[-1], train=True)[0])
            return hs[1:]

        x = jax.ShapeDtypeStruct(self.micro_shape, jnp.float32)
        self._set_shapes([h.shape for h in jax.eval_shape(outputs, x)])

    def chunk_fn(self, ticks: int, owner: Sequence[int], only: int | None = None) -> Callable:
        trainer, micro, num = self.trainer, self.schedule.microbatches, self.num_stages
        size, width, slot = self.micro_shape[0], self.width, slots(owner)
        zero, nothing = jnp.zeros((), jnp.float32), jnp.zeros((size, width))
        span = jnp.arange(micro + 2 * num - 2)  # a minibatch's ticks

        def zeros(tree: Any, *n: int) -> Any:  # [*n, ...] zeros per leaf
            return jax.tree_util.tree_map(lambda a: jnp.zeros((*n, *a.shape), a.dtype), tree)

        def branch(k: int, own: tuple, params, up, down, s, xs, ys) -> tuple:
            last, shape, (collections, grads, inputs, saved) = k == num - 1, self.shapes[k - 1], own
            f, b = s - k, s - 2 * (num - 1) + k  # the microbatches of its forward, backward
            h_of = lambda m, got: xs[m] if k == 0 else unpad_rows(got, shape)  # noqa: E731

            def stage(params, collections, h, y) -> tuple:
                out, new = apply_module(trainer.stages[k], params, collections, h, train=True)
                if last:  # the output differentiated, and (collections, loss, accuracy)
                    loss = trainer.loss(out, y)
                    return loss, (new, loss, trainer.accuracy(out, y))
                return pad_rows(out, width), (new, zero, zero)

            def forward() -> tuple:  # keeps its input and the collections it ran with
                out, (new, *_) = stage(params, collections, h_of(f, up[slot[k]]), None)
                saving = jax.tree_util.tree_map(lambda a, c: a.at[f].set(c), saved, collections)
                return new, inputs.at[f].set(up[slot[k]]), saving, out

            def backward() -> tuple:  # the stage recomputed from its input, then its VJP
                h = h_of(b, up[slot[k]] if last else inputs[b])
                ran = collections if last else jax.tree_util.tree_map(lambda a: a[b], saved)
                fn = lambda p, h=h: stage(p, ran, h, ys[b])  # noqa: E731
                _, vjp, (new, loss, accuracy) = jax.vjp(fn, params, *[h][: k > 0], has_aux=True)
                g, *g_in = vjp(jnp.ones(()) if last else down[slot[k]])
                total = jax.tree_util.tree_map(jnp.add, grads, g)
                message = pad_rows(g_in[0], width) if k > 0 else nothing
                return new if last else collections, total, message, loss, accuracy

            sent, idle = nothing, (collections, inputs, saved, nothing)
            if not last:  # the last stage's forward is in its backward, on the same tick
                has = (f >= 0) & (f < micro)
                collections, inputs, saved, sent = lax.cond(has, forward, lambda: idle)
            has, idle = (b >= 0) & (b < micro), (collections, grads, nothing, zero, zero)
            collections, grads, message, loss, accuracy = lax.cond(has, backward, lambda: idle)
            return (collections, grads, inputs, saved), (sent, message, loss, accuracy, has)

        def update(k: int, state: PipeStage, summed: tuple, active: jax.Array) -> tuple:
            mean = jax.tree_util.tree_map(lambda g: g / micro, summed[1])
            new = trainer.update_stages({k: state.stages[0]}, [k], [mean], [summed[0]])[k]
            return kept(active, PipeStage((new,)), state), ()

        branches = [lambda *a, k=k: branch(k, *a) for k in range(num)]
        updates = [lambda *a, k=k: update(k, *a) for k in range(num)]

        def program(states, mail, data, key, t0, stop):
            states = local_states(states)
            me = lax.axis_index(STAGE_AXIS)

            def minibatch(states, i):
                b, active = t0 + i, t0 + i < stop
                x, y = self.sample(data, key, b)
                xs, ys = x.reshape(micro, *self.micro_shape), y.reshape(micro, size)
                params = tuple(st.stages[0].params for st in states)

                def tick(carry, s):
                    own, up, down = carry
                    own, outs = run_own_stages(
                        me, owner, branches, own, up, down, s, xs, ys, extras=params, only=only
                    )
                    up, down = (by_slot(me, owner, [o[i] for o in outs]) for i in range(2))
                    up, down = tuple(shifted(me, owner, up, 1)), tuple(shifted(me, owner, down, -1))
                    return (own, up, down), outs[-1][2:]

                own = tuple(
                    (s.collections, zeros(s.params), *zeros((nothing, s.collections), micro))
                    for s in (st.stages[0] for st in states)
                )
                mails = tuple(nothing for _ in range(max(slot) + 1))
                (own, _, _), out = lax.scan(tick, (own, mails, mails), span)
                states, _ = run_own_stages(
                    me, owner, updates, states, active, extras=[o[:2] for o in own], only=only
                )
                k = jnp.zeros((span.size, num), jnp.float32)
                return states, TickMetrics(*out[:2], out[2] & active, k, k > 0, k)

            states, metrics = lax.scan(minibatch, states, jnp.arange(ticks))
            metrics = jax.tree_util.tree_map(lambda m: m.reshape(-1, *m.shape[2:]), metrics)
            return global_states(states), mail, gathered(metrics)

        return program


def program_for(trainer: Trainer, schedule: Schedule, batches: BatchSource) -> Program:
    """The program of ``schedule.kind`` for ``trainer``."""
    if schedule.kind == "sg_pipeline":
        if not trainer.decoupled:
            raise ValueError("the decoupled pipeline needs a decoupled Trainer")
        return (UnlockedProgram if trainer.unlocked else SgProgram)(trainer, schedule, batches)
    if trainer.decoupled:
        raise ValueError(f"{schedule.kind} is backprop: it needs a backprop Trainer")
    return BpProgram(trainer, schedule, batches)


# --------------------------------------------------------------------------- reference


def accumulated_backprop_step(
    trainer: Trainer,
    state: TrainerState,
    images: jax.Array,
    labels: jax.Array,
    microbatches: int,
) -> tuple[TrainerState, StepMetrics]:
    """Single-device backprop with gradients accumulated over ``microbatches`` equal slices
    (what GPipe computes; the tests' reference).

    Slice m is ``images[m * B/M : (m + 1) * B/M]``; BatchNorm sees one slice at a time and its
    running averages are updated slice by slice; the update uses the mean of the slices' gradients.
    With one microbatch this is ``Trainer.step`` with ``backprop()``.
    """
    size = images.shape[0] // microbatches
    current, total, losses, accuracies = state, None, [], []
    for m in range(microbatches):
        x, y = images[m * size : (m + 1) * size], labels[m * size : (m + 1) * size]
        grads, collections, loss, output = trainer.backprop_gradients(current, x, y)
        current = current._replace(
            stages=tuple(
                s._replace(collections=c) for s, c in zip(current.stages, collections, strict=True)
            )
        )
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
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

"""The layer-parallel schedules as one SPMD program: stages on a ``stages`` mesh axis.

The dispatch engines (``sg_pipeline``, ``bp_pipeline``) call one jitted function per stage per
tick from one Python process and move messages with ``device_put``. Here one compiled program,
run on every device of a one-axis mesh under ``jax.shard_map``, does a whole chunk of ticks in a
``lax.scan``: at each tick every device runs its own pipeline stage (``lax.switch`` on
``lax.axis_index``), then activations move one device forward and messages one device back with
``lax.ppermute``. The program is the same on every device and every process, so it spans hosts
(``jax.distributed``) and costs one dispatch per chunk instead of one per stage per tick.

The algorithm is not written again: each branch calls the dispatch engines' per-stage functions
(``hidden_tick``, ``output_tick``; ``unlocked_regress``, ``unlocked_forward``; ``stage_forward``,
``stage_backward``, ``last_microbatch``, ``apply_mean_gradients``), which call the ``Trainer``'s
per-group pieces. The schedules, and so the staleness, are the dispatch engines' exactly (see
``sgjax.parallel.sg_pipeline`` and ``sgjax.parallel.unlocked``):

* sg: stage k works on minibatch t - k at tick t; a stage's target arrives two ticks after its
  output, matched to it by a two-slot FIFO indexed by tick parity; N minibatches take N + L + 1
  ticks (fill and drain are the ticks where a stage has no input or no target); dgl and
  zero_grad have no targets (their stages learn on the input tick), --update_prob's coins are
  drawn from the tick and the batch key as the dispatch engine draws them;
* the complete unlock (--synthetic_inputs; see ``sgjax.parallel.unlocked``): every stage works
  on minibatch t at tick t, each device drawing it itself; it first regresses its synthesizer
  and the input model below it on minibatch t-1 (from the previous tick's messages), then
  trains on minibatch t with the parameters that left, each half under a ``lax.cond`` on the
  tick; N minibatches take N + 1 ticks (the last one only regresses);
* bp (GPipe; M = 1 is model parallelism): within a minibatch, stage k runs the forward of
  microbatch m at tick m + k and its backward at tick m + 2(K - 1) - k (the last stage does
  both at once), then every stage updates with the mean of its accumulated gradients. The
  backward recomputes the stage's forward from its stored input (GPipe's re-materialisation)
  instead of keeping VJP residuals across ticks; in training mode BatchNorm's output does not
  read the running averages, so the gradients are the same.

Heterogeneous stages on one axis: the global state holds, for every stage, its pytree with a
leading stage axis, so each device has a slot for every stage's state and reads and writes only
its own (``on_own_stage``: one ``lax.cond`` per stage, which XLA runs in place). A device's memory
is therefore the whole model's state, not its stage's; the first version packed each device's
own stage into one padded buffer per dtype (memory: the largest stage), and XLA copied that
buffer two or three times per tick, which made the engine 1.3x to 7x slower (BUILD_NOTES.md).
Messages are padded to the widest boundary.

A program runs a fixed number of ticks (the longest chunk plus the fill/drain ticks) and a
traced stop tick turns the surplus ticks into no-ops, so a run compiles one program for all its
chunks. Evaluation runs the test split through the stages the same way (each device applies its
stage once, activations forwarded), so no stage is copied to one device; the whole state is
gathered only for checkpoints and results.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgjax.core.trainer import StageState, Trainer, TrainerState, apply_module
from sgjax.data.device import DeviceData, sample_batch, scale_images
from sgjax.parallel.bp_pipeline import (
    apply_mean_gradients,
    last_microbatch,
    stage_backward,
    stage_forward,
)
from sgjax.parallel.sg_pipeline import (
    Coins,
    GroupState,
    HiddenTick,
    hidden_tick,
    output_tick,
    split_groups,
)
from sgjax.parallel.stages import Activations
from sgjax.parallel.unlocked import (
    Messages,
    UnlockedStage,
    split_unlocked,
    unlocked_forward,
    unlocked_regress,
)
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.engine import ChunkMetrics
from sgjax.training.loop import TrainState
from sgjax.training.model import trainer_for

STAGE_AXIS = "stages"


# --------------------------------------------------------------------------- stages' states


States = tuple
"""One pytree per pipeline stage (on a device: every stage's slot, its own one live)."""


def on_own_stage(
    me: jax.Array,
    branches: Sequence[Callable],
    states: States,
    *args: Any,
    extras: Sequence[Any] | None = None,
) -> tuple[States, Any]:
    """Each device runs ``branches[k](states[k], extras[k], *args)`` for its own stage ``k`` and
    keeps the other stages' states as they are. A branch returns its stage's new state and
    outputs of the same structure for every stage; the device's own outputs are returned.

    One ``lax.cond`` per stage, each on that stage's state alone, so XLA updates a stage's
    state in place. (A ``lax.switch`` over the stages' states packed into one padded buffer,
    the first version, made XLA copy the whole buffer two or three times per tick: measured
    1.1x to 1.8x slower on 4 CPU devices.) The price is memory: every device holds a slot for
    every stage's state (only its own is read or written).
    """
    extras = [None] * len(branches) if extras is None else extras
    new_states, outputs = [], None
    for k, branch in enumerate(branches):

        def skip(state: Any, extra: Any, *rest: Any, branch: Callable = branch) -> tuple:
            shapes = jax.eval_shape(branch, state, extra, *rest)[1]
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return state, zeros

        state, out = lax.cond(me == k, branch, skip, states[k], extras[k], *args)
        new_states.append(state)
        outputs = (
            out
            if outputs is None
            else jax.tree_util.tree_map(lambda a, b, k=k: jnp.where(me == k, a, b), out, outputs)
        )
    return tuple(new_states), outputs


def local_states(states: States) -> States:
    """Inside the program: the device's slots (the stage axis dropped)."""
    return jax.tree_util.tree_map(lambda x: x[0], states)


def global_states(states: States) -> States:
    """Out of the program: the stage axis put back."""
    return jax.tree_util.tree_map(lambda x: x[None], states)


def pad_rows(h: jax.Array, width: int) -> jax.Array:
    """``h`` flattened per example and padded with zeros to ``width`` features."""
    flat = h.reshape(h.shape[0], -1)
    return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def unpad_rows(padded: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of ``pad_rows`` for an activation of ``shape``."""
    return padded[:, : math.prod(shape[1:])].reshape(shape)


def global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host value on every process (each gives its own shards)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_value(array: jax.Array) -> np.ndarray:
    """A global array's whole value on this host (gathered if other processes hold parts)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# --------------------------------------------------------------------------- mesh


def stage_mesh(num_stages: int, num_devices: int, devices: Sequence[jax.Device] | None) -> Mesh:
    """A one-axis mesh with one device per pipeline stage (all processes' devices)."""
    available = list(jax.devices() if devices is None else devices)
    if num_devices not in (0, num_stages):
        raise ConfigError(
            f"--engine=spmd runs one pipeline stage per device: --num_devices={num_devices} "
            f"must be {num_stages} (or 0), or use --engine=dispatch to group stages on fewer "
            "devices"
        )
    if len(available) < num_stages:
        raise ConfigError(
            f"--engine=spmd needs {num_stages} devices (one per pipeline stage) but "
            f"{len(available)} {available[0].platform} device(s) are available; on the CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_stages} before starting "
            "Python"
        )
    return Mesh(np.array(available[:num_stages]), (STAGE_AXIS,))


class TickMetrics(NamedTuple):
    """Per tick (leading axis), gathered over the stages (second axis where per stage)."""

    loss: jax.Array
    accuracy: jax.Array
    loss_valid: jax.Array
    sg_loss: jax.Array
    """Per tick and stage."""
    sg_valid: jax.Array
    input_loss: jax.Array | None = None
    """Per tick and stage: the complete unlock's input model of stage j (valid with
    ``sg_valid``: it regresses at the same ticks as the synthesizers); None otherwise."""


def _gathered(metrics: TickMetrics) -> TickMetrics:
    """A chunk's per-device metrics (one per tick) made the same on every device, once per
    chunk: the output layer's by a sum with the others' zeros (exact), the per-stage ones by a
    gather to [ticks, stages]."""
    loss, accuracy, loss_valid, sg_loss, sg_valid, input_loss = metrics
    return TickMetrics(
        lax.psum(loss, STAGE_AXIS),
        lax.psum(accuracy, STAGE_AXIS),
        lax.psum(loss_valid.astype(jnp.int32), STAGE_AXIS) > 0,
        lax.all_gather(sg_loss, STAGE_AXIS, axis=1),
        lax.all_gather(sg_valid, STAGE_AXIS, axis=1),
        None if input_loss is None else lax.all_gather(input_loss, STAGE_AXIS, axis=1),
    )


def _send_with_labels(
    h: jax.Array, labels: jax.Array, perm: list[tuple[int, int]]
) -> tuple[jax.Array, jax.Array]:
    """``h`` and its labels to the next device in one ``ppermute`` (labels as a bit-cast
    float32 column: one collective per direction and tick)."""
    column = lax.bitcast_convert_type(labels, jnp.float32)[:, None]
    received = lax.ppermute(jnp.concatenate([h, column], axis=1), STAGE_AXIS, perm)
    return received[:, :-1], lax.bitcast_convert_type(received[:, -1], jnp.int32)


def _window(valid: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.asarray(values[valid.astype(bool)], np.float32)


def group_output_shapes(
    trainer: Trainer, config: TrainConfig, data: DeviceData
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The shape of a minibatch's images and of every decoupled group's output (the next
    group's input)."""
    batch = jax.eval_shape(
        lambda d: sample_batch(jax.random.PRNGKey(0), d, config.batch_size), data
    )
    shapes = [tuple(h.shape) for h in trainer.boundary_shapes(batch.images)]
    return tuple(batch.images.shape), shapes


# --------------------------------------------------------------------------- the sg program


class Mail(NamedTuple):
    """A stage's messages between ticks (global arrays: a leading stage axis)."""

    inbox_h: jax.Array
    """Activations arriving from the stage below, padded: [B, F]."""
    inbox_labels: jax.Array
    target: jax.Array
    """Target arriving from the stage above, padded: [B, F]."""
    fifo_h: jax.Array
    """This stage's last two outputs, slot ``tick % 2``: [2, B, F]."""
    fifo_labels: jax.Array


class Sends(NamedTuple):
    """What a stage's tick sends on (padded) and reports."""

    h: jax.Array
    labels: jax.Array
    message: jax.Array
    has_input: jax.Array
    metrics: TickMetrics


class SgProgram:
    """The synthetic-gradient pipeline of ``sgjax.parallel.sg_pipeline`` as one SPMD program."""

    mail_type = Mail

    def __init__(self, trainer: Trainer, config: TrainConfig, mesh: Mesh, data: DeviceData):
        self.trainer, self.config, self.mesh = trainer, config, mesh
        self.num_hidden = len(trainer.groups) - 1
        if mesh.devices.size != len(trainer.groups):
            raise ValueError("the mesh needs one device per group")
        self.input_shape, self.shapes = group_output_shapes(trainer, config, data)
        self.width = max(math.prod(s[1:]) for s in self.shapes)
        self.surplus = self.num_hidden + 1
        """Ticks a chunk may need beyond its minibatches (fill and drain)."""

    def split(self, model: TrainerState) -> list[Any]:
        """The pipeline stages' states: decoupled groups, then the last group's stages."""
        groups, last = split_groups(self.trainer, model)
        return [*groups, last]

    def join(self, states: Sequence[Any]) -> TrainerState:
        stages = tuple(s for group in states[:-1] for s in group.stages) + tuple(states[-1])
        return TrainerState(stages, tuple(group.synthesizer for group in states[:-1]))

    def empty_mail(self) -> dict[str, np.ndarray]:
        d, b, f = len(self.trainer.groups), self.config.batch_size, self.width
        return dict(
            inbox_h=np.zeros((d, b, f), np.float32),
            inbox_labels=np.zeros((d, b), np.int32),
            target=np.zeros((d, b, f), np.float32),
            fifo_h=np.zeros((d, 2, b, f), np.float32),
            fifo_labels=np.zeros((d, 2, b), np.int32),
        )

    # ------------------------------------------------------------------ one tick

    def _flags(self, k: int, t: jax.Array, stop: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whether stage ``k`` has an input and (decoupled) a target at tick ``t``."""
        n = self.config.num_steps
        active = t < stop
        has_input = active & (t - k >= 0) & (t - k < n)
        has_target = active & (t - k - 2 >= 0) & (t - k - 2 < n)
        if self.trainer.local:  # greedy local learning, zero gradient: no targets
            has_target = jnp.zeros((), bool)
        return has_input, has_target

    def _coins(self, key: jax.Array, t: jax.Array) -> Coins | None:
        """The stochastic updates' coins at tick ``t`` (None at --update_prob=1)."""
        return None if self.config.update_prob == 1.0 else Coins(key, t)

    def _hidden_branch(self, k: int) -> Callable:
        trainer, config = self.trainer, self.config
        shape_out = self.shapes[k]
        shape_in = self.input_shape if k == 0 else self.shapes[k - 1]

        def branch(group: GroupState, _: None, mail: Mail, t: jax.Array, stop, data, key):
            has_input, has_target = self._flags(k, t, stop)
            # When the boundary's state learns: from a target (sg, cdni), or from the input
            # (local methods: DGL's head).
            learns = has_input if trainer.local else has_target
            slot = t % 2
            stored = Activations(unpad_rows(mail.fifo_h[slot], shape_out), mail.fifo_labels[slot])
            target = unpad_rows(mail.target, shape_out)

            def inputs() -> Activations:
                if k == 0:
                    batch = sample_batch(jax.random.fold_in(key, t), data, config.batch_size)
                    return Activations(batch.images, batch.labels)
                return Activations(unpad_rows(mail.inbox_h, shape_in), mail.inbox_labels)

            def normalised(out: HiddenTick) -> tuple:
                sent_h = jnp.zeros((config.batch_size, self.width), jnp.float32)
                sent_labels = jnp.zeros((config.batch_size,), jnp.int32)
                message = jnp.zeros((config.batch_size, self.width), jnp.float32)
                if out.sent is not None:
                    sent_h, sent_labels = pad_rows(out.sent.h, self.width), out.sent.labels
                if out.message is not None:
                    message = pad_rows(out.message, self.width)
                sg_loss = jnp.zeros((), jnp.float32) if out.sg_loss is None else out.sg_loss
                return out.group, sent_h, sent_labels, message, sg_loss

            def work() -> tuple:
                # The steady tick once (one copy of the stage's code in the program), then
                # what the fill and drain ticks of the dispatch engine would have kept: the
                # group update only with an input (the synthesizer then keeps the statistics of
                # its forward pass), the synthesizer's update only with a target. Exact:
                # hidden_tick's parts do not read each other's results.
                out = hidden_tick(
                    group,
                    inputs(),
                    stored,
                    target,
                    self._coins(key, t),
                    trainer=trainer,
                    j=k,
                    update_prob=config.update_prob,
                )
                synth = out.group.synthesizer
                statistics = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(has_input, new, old),
                    synth.collections,
                    group.synthesizer.collections,
                )
                learnt = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(learns, new, old),
                    (synth.params, synth.opt_state),
                    (group.synthesizer.params, group.synthesizer.opt_state),
                )
                stages = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(has_input, new, old), out.group.stages, group.stages
                )
                kept = HiddenTick(
                    GroupState(
                        stages,
                        synth._replace(
                            params=learnt[0], opt_state=learnt[1], collections=statistics
                        ),
                    ),
                    out.sent,
                    out.message,
                    jnp.where(learns, out.sg_loss, 0.0),
                )
                return normalised(kept)

            def idle() -> tuple:
                return normalised(HiddenTick(group, None, None, None))

            new, sent_h, sent_labels, message, sg_loss = lax.cond(
                has_input | has_target, work, idle
            )
            zero = jnp.zeros((), jnp.float32)
            metrics = TickMetrics(zero, zero, jnp.zeros((), bool), sg_loss, learns)
            return new, Sends(sent_h, sent_labels, message, has_input, metrics)

        return branch

    def _output_branch(self) -> Callable:
        trainer, config, k = self.trainer, self.config, self.num_hidden
        shape_in, p = self.shapes[-1], self.config.update_prob

        def branch(stages: tuple, _: None, mail: Mail, t: jax.Array, stop, data, key):
            del data
            has_input, _ = self._flags(k, t, stop)
            inputs = Activations(unpad_rows(mail.inbox_h, shape_in), mail.inbox_labels)
            zero = jnp.zeros((), jnp.float32)

            def train() -> tuple:
                out = output_tick(
                    stages, inputs, self._coins(key, t), trainer=trainer, update_prob=p
                )
                message = pad_rows(out.message, self.width)
                return out.stages, message, out.loss, out.accuracy

            def idle() -> tuple:
                message = jnp.zeros((config.batch_size, self.width), jnp.float32)
                return stages, message, zero, zero

            new, message, loss, accuracy = lax.cond(has_input, train, idle)
            sent_h = jnp.zeros((config.batch_size, self.width), jnp.float32)
            sent_labels = jnp.zeros((config.batch_size,), jnp.int32)
            metrics = TickMetrics(loss, accuracy, has_input, zero, jnp.zeros((), bool))
            return new, Sends(sent_h, sent_labels, message, jnp.zeros((), bool), metrics)

        return branch

    def chunk_fn(self, ticks: int) -> Callable:
        """The per-device program for ``ticks`` ticks from ``t0``, those at ``stop`` or after
        doing nothing."""
        num = len(self.trainer.groups)
        branches = [
            *(self._hidden_branch(k) for k in range(self.num_hidden)),
            self._output_branch(),
        ]
        forward = [(i, i + 1) for i in range(num - 1)]
        backward = [(i + 1, i) for i in range(num - 1)]

        def program(states: States, mail: Mail, data, key, t0, stop):
            states, mail = local_states(states), Mail(*(m[0] for m in mail))
            me = lax.axis_index(STAGE_AXIS)

            def tick(carry, i):
                states, mail = carry
                t = t0 + i
                new, sends = on_own_stage(me, branches, states, mail, t, stop, data, key)
                sent_h, sent_labels, message, has_input, metrics = sends
                slot = t % 2
                fifo_h = mail.fifo_h.at[slot].set(jnp.where(has_input, sent_h, mail.fifo_h[slot]))
                fifo_labels = mail.fifo_labels.at[slot].set(
                    jnp.where(has_input, sent_labels, mail.fifo_labels[slot])
                )
                active = t < stop
                received = Mail(
                    *_send_with_labels(sent_h, sent_labels, forward),
                    lax.ppermute(message, STAGE_AXIS, backward),
                    fifo_h,
                    fifo_labels,
                )
                mail = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), received, mail)
                return (new, mail), metrics

            (states, mail), metrics = lax.scan(tick, (states, mail), jnp.arange(ticks))
            return global_states(states), Mail(*(m[None] for m in mail)), _gathered(metrics)

        return program

    def stage_alone(self, k: int, repeats: int) -> Callable:
        """``repeats`` steady ticks of stage ``k`` alone (with an input and a target; zeros as
        messages), for ``SpmdEngine.stage_ms``."""
        branch = self._output_branch() if k == self.num_hidden else self._hidden_branch(k)
        mail = Mail(*(jnp.asarray(m[0]) for m in self.empty_mail().values()))
        t, stop = jnp.int32(k + 2), jnp.int32(np.iinfo(np.int32).max)

        def run(state: Any, data: DeviceData, key: jax.Array) -> Any:
            def tick(state: Any, _: None) -> tuple:
                return branch(state, None, mail, t, stop, data, key)[0], None

            return lax.scan(tick, state, None, length=repeats)[0]

        return run

    def stage_eval(self, k: int, state: Any, h: jax.Array) -> jax.Array:
        """Pipeline stage ``k`` in evaluation mode."""
        stages = state if k == self.num_hidden else state.stages
        params = tuple(s.params for s in stages)
        cols = tuple(s.collections for s in stages)
        return self.trainer.apply_group(k, params, cols, h, False)[0]

    # ------------------------------------------------------------------ in flight

    def tick_after(self, batches: int) -> int:
        """The next tick once the last group has trained on ``batches`` minibatches."""
        if batches == 0:
            return 0
        return batches + self.num_hidden + (batches == self.config.num_steps)

    def inflight(self, mail: Mapping[str, np.ndarray], tick: int) -> dict[str, np.ndarray]:
        """The dispatch engine's names (``SgPipeline.inflight``) for what is in flight at
        ``tick``, so either engine resumes the other's checkpoints."""
        out: dict[str, np.ndarray] = {}
        n = self.config.num_steps
        for k in range(0 if self.trainer.local else self.num_hidden):  # local: no FIFO, targets
            shape = self.shapes[k]
            entries = [s for s in (tick - 2, tick - 1) if 0 <= s - k < n]
            for position, s in enumerate(entries):
                out[f"fifo_{k}_{position}_h"] = self._unpad(mail["fifo_h"][k, s % 2], shape)
                out[f"fifo_{k}_{position}_labels"] = np.asarray(mail["fifo_labels"][k, s % 2])
            if 0 <= tick - k - 2 < n:
                out[f"target_{k}"] = self._unpad(mail["target"][k], shape)
        for k in range(1, self.num_hidden + 1):
            if 0 <= tick - k < n:
                out[f"inbox_{k}_h"] = self._unpad(mail["inbox_h"][k], self.shapes[k - 1])
                out[f"inbox_{k}_labels"] = np.asarray(mail["inbox_labels"][k])
        return out

    @staticmethod
    def _unpad(padded: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(padded)[:, : math.prod(shape[1:])].reshape(shape)

    def mail_from_inflight(self, inflight: Mapping[str, Any], tick: int) -> dict[str, np.ndarray]:
        """Mailboxes (host arrays) holding ``inflight`` as they were at ``tick``."""
        mail = self.empty_mail()
        n = self.config.num_steps

        def padded(value: Any) -> np.ndarray:
            flat = np.asarray(value, np.float32).reshape(self.config.batch_size, -1)
            return np.pad(flat, ((0, 0), (0, self.width - flat.shape[1])))

        for k in range(0 if self.trainer.local else self.num_hidden):
            entries = [s for s in (tick - 2, tick - 1) if 0 <= s - k < n]
            for position, s in enumerate(entries):
                mail["fifo_h"][k, s % 2] = padded(inflight[f"fifo_{k}_{position}_h"])
                mail["fifo_labels"][k, s % 2] = np.asarray(inflight[f"fifo_{k}_{position}_labels"])
            if f"target_{k}" in inflight:
                mail["target"][k] = padded(inflight[f"target_{k}"])
        for k in range(1, self.num_hidden + 1):
            if f"inbox_{k}_h" in inflight:
                mail["inbox_h"][k] = padded(inflight[f"inbox_{k}_h"])
                mail["inbox_labels"][k] = np.asarray(inflight[f"inbox_{k}_labels"])
        return mail


# --------------------------------------------------------------------------- the unlocked program


class UnlockedMail(NamedTuple):
    """The previous tick's messages of a stage (``Messages``, padded; global arrays: a leading
    stage axis)."""

    below: jax.Array
    """o_{j-1}^{t-1} from the stage below: [B, F]."""
    stored: jax.Array
    """This stage's own o_j^{t-1}: [B, F]."""
    target: jax.Array
    """The gradient at stage j+1's input on minibatch t-1: [B, F]."""


class UnlockedSends(NamedTuple):
    """What a stage's tick sends (padded) and reports."""

    output: jax.Array
    message: jax.Array
    metrics: TickMetrics


class UnlockedProgram:
    """The complete unlock of ``sgjax.parallel.unlocked`` as one SPMD program: every stage on
    minibatch t at tick t, its regressions on minibatch t-1 first (``unlocked_regress``), then
    its update (``unlocked_forward``), each under a ``lax.cond`` on the tick."""

    mail_type = UnlockedMail

    def __init__(self, trainer: Trainer, config: TrainConfig, mesh: Mesh, data: DeviceData):
        self.trainer, self.config, self.mesh = trainer, config, mesh
        self.num_stages = len(trainer.groups)
        if mesh.devices.size != self.num_stages:
            raise ValueError("the mesh needs one device per group")
        self.input_shape, self.shapes = group_output_shapes(trainer, config, data)
        self.width = max(math.prod(s[1:]) for s in self.shapes)
        self.surplus = 1
        """The drain tick (the last minibatch's regressions)."""

    def split(self, model: TrainerState) -> list[UnlockedStage]:
        return split_unlocked(self.trainer, model)

    def join(self, states: Sequence[UnlockedStage]) -> TrainerState:
        return TrainerState(
            tuple(s for stage in states for s in stage.stages),
            tuple(stage.synthesizer for stage in states[:-1]),
            tuple(stage.input_model for stage in states[1:]),
        )

    def empty_mail(self) -> dict[str, np.ndarray]:
        shape = (self.num_stages, self.config.batch_size, self.width)
        return {name: np.zeros(shape, np.float32) for name in UnlockedMail._fields}

    # ------------------------------------------------------------------ one tick

    def _branch(self, j: int) -> Callable:
        trainer, config = self.trainer, self.config
        last = j == self.num_stages - 1
        common = dict(
            trainer=trainer, j=j, batch_size=config.batch_size, update_prob=config.update_prob
        )
        zero = jnp.zeros((), jnp.float32)

        def padded(h: jax.Array | None) -> jax.Array:
            if h is None:
                return jnp.zeros((config.batch_size, self.width), jnp.float32)
            return pad_rows(h, self.width)

        def branch(stage: UnlockedStage, _: None, mail: UnlockedMail, t, stop, data, key):
            active = t < stop
            regress = active & (t > 0) & (t <= config.num_steps)
            forward = active & (t < config.num_steps)
            messages = Messages(
                unpad_rows(mail.below, self.shapes[j - 1]) if j > 0 else None,
                None if last else unpad_rows(mail.stored, self.shapes[j]),
                None if last else unpad_rows(mail.target, self.shapes[j]),
            )

            def regression(stage: UnlockedStage) -> tuple:
                out = unlocked_regress(stage, data, key, t, messages, **common)
                losses = (zero if x is None else x for x in (out.sg_loss, out.input_loss))
                return out.stage, *losses

            def train(stage: UnlockedStage) -> tuple:
                input_shape = self.shapes[j - 1][1:] if j > 0 else ()
                out = unlocked_forward(stage, data, key, t, input_shape=input_shape, **common)
                losses = (zero if x is None else x for x in (out.loss, out.accuracy))
                return out.stage, padded(out.output), padded(out.message), *losses

            # The regressions first: the update reads the parameters they leave.
            stage, sg_loss, input_loss = lax.cond(
                regress, regression, lambda s: (s, zero, zero), stage
            )
            stage, output, message, loss, accuracy = lax.cond(
                forward, train, lambda s: (s, padded(None), padded(None), zero, zero), stage
            )
            metrics = TickMetrics(loss, accuracy, forward & last, sg_loss, regress, input_loss)
            return stage, UnlockedSends(output, message, metrics)

        return branch

    def chunk_fn(self, ticks: int) -> Callable:
        """The per-device program for ``ticks`` ticks from ``t0``, those at ``stop`` or after
        doing nothing."""
        branches = [self._branch(j) for j in range(self.num_stages)]
        forward = [(i, i + 1) for i in range(self.num_stages - 1)]
        backward = [(i + 1, i) for i in range(self.num_stages - 1)]

        def program(states: States, mail: UnlockedMail, data, key, t0, stop):
            states, mail = local_states(states), UnlockedMail(*(m[0] for m in mail))
            me = lax.axis_index(STAGE_AXIS)

            def tick(carry, i):
                states, mail = carry
                t = t0 + i
                new, sends = on_own_stage(me, branches, states, mail, t, stop, data, key)
                received = UnlockedMail(
                    lax.ppermute(sends.output, STAGE_AXIS, forward),
                    sends.output,
                    lax.ppermute(sends.message, STAGE_AXIS, backward),
                )
                active = t < stop
                mail = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), received, mail)
                return (new, mail), sends.metrics

            (states, mail), metrics = lax.scan(tick, (states, mail), jnp.arange(ticks))
            return global_states(states), UnlockedMail(*(m[None] for m in mail)), _gathered(metrics)

        return program

    def stage_alone(self, j: int, repeats: int) -> Callable:
        """``repeats`` steady ticks of stage ``j`` alone (regressions and update; zeros as
        messages), for ``SpmdEngine.stage_ms``."""
        branch = self._branch(j)
        mail = UnlockedMail(*(jnp.asarray(m[0]) for m in self.empty_mail().values()))
        t, stop = jnp.int32(1), jnp.int32(np.iinfo(np.int32).max)

        def run(state: UnlockedStage, data: DeviceData, key: jax.Array) -> UnlockedStage:
            def tick(state: UnlockedStage, _: None) -> tuple:
                return branch(state, None, mail, t, stop, data, key)[0], None

            return lax.scan(tick, state, None, length=repeats)[0]

        return run

    def stage_eval(self, j: int, state: UnlockedStage, h: jax.Array) -> jax.Array:
        """Group ``j``'s stages in evaluation mode (on the true input)."""
        params = tuple(s.params for s in state.stages)
        cols = tuple(s.collections for s in state.stages)
        return self.trainer.apply_group(j, params, cols, h, False)[0]

    # ------------------------------------------------------------------ in flight

    def tick_after(self, batches: int) -> int:
        """The next tick once every stage has trained on ``batches`` minibatches (the run's
        last minibatch also has its regressions done)."""
        return batches + (batches == self.config.num_steps and batches > 0)

    def _names(self, tick: int) -> list[tuple[str, int, tuple[int, ...]]]:
        """The messages in flight at ``tick`` (those of tick - 1, which trained): name, stage,
        shape."""
        if not 0 < tick <= self.config.num_steps:
            return []
        names = [("below", j, self.shapes[j - 1]) for j in range(1, self.num_stages)]
        for j in range(self.num_stages - 1):
            names += [("stored", j, self.shapes[j]), ("target", j, self.shapes[j])]
        return names

    def inflight(self, mail: Mapping[str, np.ndarray], tick: int) -> dict[str, np.ndarray]:
        """The dispatch engine's names (``UnlockedPipeline.inflight``) for what is in flight at
        ``tick``, so either engine resumes the other's checkpoints."""
        return {
            f"{name}_{j}": SgProgram._unpad(mail[name][j], shape)
            for name, j, shape in self._names(tick)
        }

    def mail_from_inflight(self, inflight: Mapping[str, Any], tick: int) -> dict[str, np.ndarray]:
        """Mailboxes (host arrays) holding ``inflight`` as they were at ``tick``."""
        mail = self.empty_mail()
        for name, j, _ in self._names(tick):
            flat = np.asarray(inflight[f"{name}_{j}"], np.float32).reshape(
                self.config.batch_size, -1
            )
            mail[name][j, :, : flat.shape[1]] = flat
        return mail


# --------------------------------------------------------------------------- the bp program


class BpCarry(NamedTuple):
    """One minibatch's work in progress on a device (local arrays)."""

    collections: States
    """Per stage, its other variables (BatchNorm statistics), advancing with each forward
    (parameters and optimizer state are read-only until the update, so they stay out of the
    loop's carry)."""
    grads: States
    """Per stage, its gradients summed over the microbatches so far."""
    stored: jax.Array
    """Inputs of the microbatches (padded), for the backward's recomputation: [M, B/M, F]."""
    inbox: jax.Array
    cotangent: jax.Array


class BpTick(NamedTuple):
    """What a stage's tick keeps (its stored inputs), sends on (padded) and reports."""

    stored: jax.Array
    sent: jax.Array
    message: jax.Array
    loss: jax.Array
    accuracy: jax.Array
    valid: jax.Array


class BpProgram:
    """Model-parallel (M = 1) and GPipe backprop of ``sgjax.parallel.bp_pipeline`` as one SPMD
    program: a scan over minibatches, each a scan over its ticks, then every stage's update."""

    def __init__(
        self,
        trainer: Trainer,
        config: TrainConfig,
        mesh: Mesh,
        data: DeviceData,
        microbatches: int,
    ):
        self.trainer, self.config, self.mesh = trainer, config, mesh
        self.microbatches = microbatches
        self.num_stages = len(trainer.stages)
        if mesh.devices.size != self.num_stages:
            raise ValueError("the mesh needs one device per stage")
        model = jax.eval_shape(
            lambda: trainer.init(
                jax.random.PRNGKey(0), jnp.zeros((1, *data.train_images.shape[1:]))
            )
        )
        size = config.batch_size // microbatches
        h = jax.ShapeDtypeStruct((size, *data.train_images.shape[1:]), jnp.float32)
        self.input_shape = tuple(h.shape)
        self.shapes = []
        for k in range(self.num_stages - 1):
            s = model.stages[k]
            h = jax.eval_shape(
                lambda x, s, k=k: apply_module(
                    trainer.stages[k], s.params, s.collections, x, train=True
                )[0],
                h,
                s,
            )
            self.shapes.append(tuple(h.shape))
        self.width = max(math.prod(s[1:]) for s in self.shapes)
        self.ticks = microbatches + 2 * (self.num_stages - 1)

    def split(self, model: TrainerState) -> list[Any]:
        return list(model.stages)

    def join(self, states: Sequence[Any]) -> TrainerState:
        return TrainerState(tuple(states), ())

    def _zeros(self) -> jax.Array:
        return jnp.zeros((self.input_shape[0], self.width), jnp.float32)

    def _hidden_branch(self, k: int) -> Callable:
        trainer, micro = self.trainer, self.microbatches
        shape_in = self.input_shape if k == 0 else self.shapes[k - 1]
        shape_out = self.shapes[k]
        back_offset = 2 * (self.num_stages - 1) - k

        def branch(own: tuple, state: StageState, carry: BpCarry, s, images, labels, active):
            del labels
            statistics, grads = own
            state = state._replace(collections=statistics)
            fm, bm = s - k, s - back_offset
            has_forward = active & (fm >= 0) & (fm < micro)
            has_backward = active & (bm >= 0) & (bm < micro)
            forward_fn = functools.partial(stage_forward, trainer=trainer, k=k)

            def input_of(m: jax.Array) -> jax.Array:
                if k == 0:
                    return images[jnp.clip(m, 0, micro - 1)]
                return unpad_rows(carry.stored[jnp.clip(m, 0, micro - 1)], shape_in)

            def forward() -> tuple:
                h = (
                    images[jnp.clip(fm, 0, micro - 1)]
                    if k == 0
                    else unpad_rows(carry.inbox, shape_in)
                )
                fwd = forward_fn(state.params, state.collections, h)
                stored = carry.stored
                if k > 0:
                    stored = stored.at[jnp.clip(fm, 0, micro - 1)].set(carry.inbox)
                return fwd.collections, stored, pad_rows(fwd.output, self.width)

            def no_forward() -> tuple:
                return state.collections, carry.stored, self._zeros()

            # The conds return this microbatch's gradients, added to the sum outside them:
            # a sum passed through a cond is copied by XLA at every tick.
            def backward() -> tuple:
                fwd = forward_fn(state.params, state.collections, input_of(bm))
                back = stage_backward(
                    fwd.vjp, unpad_rows(carry.cotangent, shape_out), None, send=k > 0
                )
                message = self._zeros()
                if back.input_grad is not None:
                    message = pad_rows(back.input_grad, self.width)
                return back.grads, message

            def no_backward() -> tuple:
                return jax.tree_util.tree_map(jnp.zeros_like, grads), self._zeros()

            statistics, stored, sent = lax.cond(has_forward, forward, no_forward)
            delta, message = lax.cond(has_backward, backward, no_backward)
            new_grads = jax.tree_util.tree_map(jnp.add, grads, delta)
            zero = jnp.zeros((), jnp.float32)
            out = BpTick(stored, sent, message, zero, zero, jnp.zeros((), bool))
            return (statistics, new_grads), out

        return branch

    def _last_branch(self) -> Callable:
        trainer, micro, k = self.trainer, self.microbatches, self.num_stages - 1
        shape_in = self.shapes[-1]

        def branch(own: tuple, state: StageState, carry: BpCarry, s, images, labels, active):
            del images
            statistics, grads = own
            fm = s - k
            has_forward = active & (fm >= 0) & (fm < micro)
            zero = jnp.zeros((), jnp.float32)

            def train() -> tuple:
                inputs = Activations(
                    unpad_rows(carry.inbox, shape_in), labels[jnp.clip(fm, 0, micro - 1)]
                )
                out = last_microbatch(state.params, statistics, inputs, None, trainer=trainer)
                message = pad_rows(out.input_grad, self.width)
                return out.collections, out.grads, message, out.loss, out.accuracy

            def idle() -> tuple:
                zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
                return statistics, zeros, self._zeros(), zero, zero

            statistics, delta, message, loss, accuracy = lax.cond(has_forward, train, idle)
            new_grads = jax.tree_util.tree_map(jnp.add, grads, delta)
            out = BpTick(carry.stored, self._zeros(), message, loss, accuracy, has_forward)
            return (statistics, new_grads), out

        return branch

    def _update_branch(self, k: int) -> Callable:
        update = functools.partial(
            apply_mean_gradients, trainer=self.trainer, k=k, microbatches=self.microbatches
        )

        def branch(state: StageState, accumulated: tuple, active: jax.Array) -> tuple:
            statistics, grads = accumulated
            new = update(state, grads, statistics)
            kept = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state)
            return kept, ()

        return branch

    def chunk_fn(self, minibatches: int) -> Callable:
        """The per-device program for ``minibatches`` minibatches from ``t0`` (those at ``stop``
        or after do nothing)."""
        num, micro, config = self.num_stages, self.microbatches, self.config
        ticks = [*(self._hidden_branch(k) for k in range(num - 1)), self._last_branch()]
        updates = [self._update_branch(k) for k in range(num)]
        forward = [(i, i + 1) for i in range(num - 1)]
        backward = [(i + 1, i) for i in range(num - 1)]
        size = config.batch_size // micro

        def program(states: States, data, key, t0, stop):
            states = local_states(states)
            me = lax.axis_index(STAGE_AXIS)

            def minibatch(states: States, i: jax.Array):
                b = t0 + i
                active = b < stop
                batch = sample_batch(jax.random.fold_in(key, b), data, config.batch_size)
                images = batch.images.reshape(micro, size, *batch.images.shape[1:])
                labels = batch.labels.reshape(micro, size)
                carry = BpCarry(
                    tuple(s.collections for s in states),
                    tuple(jax.tree_util.tree_map(jnp.zeros_like, s.params) for s in states),
                    jnp.zeros((micro, size, self.width), jnp.float32),
                    self._zeros(),
                    self._zeros(),
                )

                def tick(carry: BpCarry, s: jax.Array):
                    own = tuple(zip(carry.collections, carry.grads, strict=True))
                    own, out = on_own_stage(
                        me, ticks, own, carry, s, images, labels, active, extras=states
                    )
                    carry = BpCarry(
                        tuple(o[0] for o in own),
                        tuple(o[1] for o in own),
                        out.stored,
                        lax.ppermute(out.sent, STAGE_AXIS, forward),
                        lax.ppermute(out.message, STAGE_AXIS, backward),
                    )
                    zero = jnp.zeros((), jnp.float32)
                    metrics = TickMetrics(
                        out.loss, out.accuracy, out.valid, zero, jnp.zeros((), bool)
                    )
                    return carry, metrics

                carry, metrics = lax.scan(tick, carry, jnp.arange(self.ticks))
                accumulated = tuple(zip(carry.collections, carry.grads, strict=True))
                new, _ = on_own_stage(me, updates, states, active, extras=accumulated)
                return new, metrics

            states, metrics = lax.scan(minibatch, states, jnp.arange(minibatches))
            metrics = jax.tree_util.tree_map(lambda m: m.reshape(-1, *m.shape[2:]), metrics)
            return global_states(states), _gathered(metrics)

        return program

    def stage_alone(self, k: int, repeats: int) -> Callable:
        """``repeats`` minibatches of stage ``k`` alone (its M forwards and M backwards, zeros
        as messages, then its update), for ``SpmdEngine.stage_ms``."""
        branch = self._last_branch() if k == self.num_stages - 1 else self._hidden_branch(k)
        update = self._update_branch(k)
        micro, config = self.microbatches, self.config
        size = config.batch_size // micro
        active = jnp.ones((), bool)

        def run(state: StageState, data: DeviceData, key: jax.Array) -> StageState:
            def minibatch(state: StageState, b: jax.Array) -> tuple:
                batch = sample_batch(jax.random.fold_in(key, b), data, config.batch_size)
                images = batch.images.reshape(micro, size, *batch.images.shape[1:])
                labels = batch.labels.reshape(micro, size)
                own = (state.collections, jax.tree_util.tree_map(jnp.zeros_like, state.params))
                stored = jnp.zeros((micro, size, self.width), jnp.float32)

                def tick(carry: tuple, s: jax.Array) -> tuple:
                    own, stored = carry
                    inputs = BpCarry((), (), stored, self._zeros(), self._zeros())
                    own, out = branch(own, state, inputs, s, images, labels, active)
                    return (own, out.stored), None

                (own, _), _ = lax.scan(tick, (own, stored), jnp.arange(self.ticks))
                return update(state, own, active)[0], None

            return lax.scan(minibatch, state, jnp.arange(repeats))[0]

        return run

    def stage_eval(self, k: int, state: StageState, h: jax.Array) -> jax.Array:
        return apply_module(
            self.trainer.stages[k], state.params, state.collections, h, train=False
        )[0]


# --------------------------------------------------------------------------- the engine


class SpmdEngine:
    """A layer-parallel schedule as one SPMD program per chunk; an ``Engine`` of the training
    loop. ``kind`` is ``sg_pipeline``, ``bp_model_parallel`` or ``bp_gpipe``; ``start`` (and,
    for sg, ``inflight``, as ``SgPipeline.inflight`` names them) say where it continues."""

    def __init__(
        self,
        config: TrainConfig,
        kind: str,
        data: DeviceData,
        start: TrainState,
        mesh: Mesh,
        microbatches: int = 1,
        inflight: Mapping[str, Any] | None = None,
    ) -> None:
        self.config, self.kind, self.mesh = config, kind, mesh
        self.max_chunk = config.chunk_steps
        self.trainer = trainer_for(config)
        self.sharded = NamedSharding(mesh, PartitionSpec(STAGE_AXIS))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        host_data = jax.device_get(data)
        self.data = jax.tree_util.tree_map(lambda x: global_array(x, self.replicated), host_data)
        self.key = global_array(jax.device_get(start.key), self.replicated)
        self._key = start.key
        self._done = int(start.step)
        self.program: SgProgram | UnlockedProgram | BpProgram
        if kind == "sg_pipeline":
            program = UnlockedProgram if self.trainer.unlocked else SgProgram
            self.program = program(self.trainer, config, mesh, host_data)
            self.tick = self.program.tick_after(self._done)
            mail = self.program.mail_from_inflight(inflight or {}, self.tick)
            self.mail = self.program.mail_type(
                **{name: global_array(value, self.sharded) for name, value in mail.items()}
            )
            self.surplus = self.program.surplus
        else:
            self.program = BpProgram(self.trainer, config, mesh, host_data, microbatches)
            self.tick = self._done
            self.mail = None
            self.surplus = 0
        self.states = self._place(jax.device_get(start.model))
        self._chunk: jax.stages.Compiled | None = None
        self._evaluate: jax.stages.Compiled | None = None
        self._gather: Callable | None = None
        self.traces = 0
        """How many times the chunk program was traced (compiled) in this engine."""

    def _place(self, model: TrainerState) -> States:
        """Every stage's state in a slot on every device (``on_own_stage``)."""
        num = self.mesh.devices.size
        return jax.tree_util.tree_map(
            lambda leaf: global_array(np.stack([np.asarray(leaf)] * num), self.sharded),
            tuple(self.program.split(model)),
        )

    def _shard_map(self, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def compile(self, chunk_lengths: Collection[int]) -> None:
        """Compile the chunk program (one for every chunk: a fixed number of ticks, a traced
        stop) and the evaluation."""
        del chunk_lengths
        stage, rep = PartitionSpec(STAGE_AXIS), PartitionSpec()
        length = self.max_chunk + self.surplus
        per_device = self.program.chunk_fn(length)

        def counted(*args: Any) -> Any:
            self.traces += 1
            return per_device(*args)

        scalar = global_array(np.int32(0), self.replicated)
        if self.kind == "sg_pipeline":
            fn = self._shard_map(counted, (stage, stage, rep, rep, rep, rep), (stage, stage, rep))
            args = (self.states, self.mail, self.data, self.key, scalar, scalar)
            self._chunk = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()
        else:
            fn = self._shard_map(counted, (stage, rep, rep, rep, rep), (stage, rep))
            args = (self.states, self.data, self.key, scalar, scalar)
            self._chunk = jax.jit(fn, donate_argnums=(0,)).lower(*args).compile()
        evaluate = self._shard_map(self._evaluate_fn(), (stage, rep), (rep, rep))
        self._evaluate = jax.jit(evaluate).lower(self.states, self.data).compile()
        self._gather = jax.jit(lambda x: x, out_shardings=self.replicated)

    def _evaluate_fn(self) -> Callable:
        program, trainer = self.program, self.trainer
        num = self.mesh.devices.size
        forward = [(i, i + 1) for i in range(num - 1)]

        def evaluate(states: States, data: DeviceData):
            states = local_states(states)
            me = lax.axis_index(STAGE_AXIS)
            images = scale_images(data.test_images)
            rows = images.shape[0]
            zero = jnp.zeros((), jnp.float32)

            def run(k: int, inbox: jax.Array) -> tuple:
                h = images if k == 0 else unpad_rows(inbox, (rows, *program.shapes[k - 1][1:]))
                out = program.stage_eval(k, states[k], h)
                if k < num - 1:
                    return pad_rows(out, program.width), zero, zero
                loss = trainer.loss(out, data.test_labels)
                accuracy = trainer.accuracy(out, data.test_labels)
                return jnp.zeros((rows, program.width), jnp.float32), loss, accuracy

            def idle(inbox: jax.Array) -> tuple:
                return jnp.zeros_like(inbox), zero, zero

            inbox = jnp.zeros((rows, program.width), jnp.float32)
            loss = accuracy = zero
            for step in range(num):  # step s: only stage s works, on what stage s - 1 sent
                out, loss_k, accuracy_k = lax.cond(
                    me == step, functools.partial(run, step), idle, inbox
                )
                loss, accuracy = loss + loss_k, accuracy + accuracy_k
                if step < num - 1:
                    inbox = lax.ppermute(out, STAGE_AXIS, forward)
            return lax.psum(loss, STAGE_AXIS), lax.psum(accuracy, STAGE_AXIS)

        return evaluate

    def advance(self, steps: int) -> ChunkMetrics:
        """Run the ticks until the last stage has trained on ``steps`` more minibatches."""
        target = self._done + steps
        if self.kind == "sg_pipeline":
            stop = self.program.tick_after(target)
        else:
            stop = target
        t0 = global_array(np.int32(self.tick), self.replicated)
        end = global_array(np.int32(stop), self.replicated)
        if self.kind == "sg_pipeline":
            self.states, self.mail, metrics = self._chunk(
                self.states, self.mail, self.data, self.key, t0, end
            )
        else:
            self.states, metrics = self._chunk(self.states, self.data, self.key, t0, end)
        metrics = TickMetrics(*(None if m is None else host_value(m) for m in metrics))
        self.tick, self._done = stop, target
        losses = _window(metrics.loss_valid, metrics.loss)
        accuracies = _window(metrics.loss_valid, metrics.accuracy)
        boundaries = range(len(self.trainer.boundaries))
        sg = [_window(metrics.sg_valid[:, k], metrics.sg_loss[:, k]) for k in boundaries]
        inputs = ()
        if metrics.input_loss is not None:  # boundary k's input model: held by stage k + 1
            inputs = tuple(
                float(np.sum(_window(metrics.sg_valid[:, k + 1], metrics.input_loss[:, k + 1])))
                for k in boundaries
            )
        return ChunkMetrics(
            steps,
            steps * float(np.mean(losses)),
            steps * float(np.mean(accuracies)),
            tuple(float(np.sum(values)) for values in sg),
            tuple(len(values) for values in sg),
            inputs,
        )

    def state(self) -> TrainState:
        """The whole state, gathered (every process gets it) and put on this host's first
        device."""
        states = [
            jax.tree_util.tree_map(lambda a, k=k: host_value(self._gather(a))[k], stage)
            for k, stage in enumerate(self.states)
        ]
        model = jax.device_put(self.program.join(states), jax.local_devices()[0])
        step = jnp.asarray(self._done, jnp.int32)
        return TrainState(model, step, jax.device_put(self._key, jax.local_devices()[0]))

    def evaluate(self) -> tuple[float, float]:
        loss, accuracy = self._evaluate(self.states, self.data)
        return float(host_value(loss)), float(host_value(accuracy))

    def inflight(self) -> dict[str, np.ndarray]:
        if self.mail is None:
            return {}
        mail = {name: host_value(self._gather(m)) for name, m in self.mail._asdict().items()}
        return self.program.inflight(mail, self.tick)

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's milliseconds per tick (sg) or per minibatch (bp), timed alone on this
        process's first device: ``repeats`` of them in one compiled loop (compilation and a
        warm-up run excluded), from the current state. The inputs of the ideal speed-up, as
        the dispatch engines' ``stage_ms``."""
        device = jax.local_devices()[0]
        states = self.program.split(self.state().model)
        data = jax.tree_util.tree_map(
            lambda x: jax.device_put(x.addressable_data(0), device), self.data
        )
        key = jax.device_put(self._key, device)
        times = []
        for k, state in enumerate(states):
            state = jax.device_put(state, device)
            run = jax.jit(self.program.stage_alone(k, repeats)).lower(state, data, key).compile()
            jax.block_until_ready(run(state, data, key))
            start = time.perf_counter()
            jax.block_until_ready(run(state, data, key))
            times.append(1e3 * (time.perf_counter() - start) / repeats)
        return tuple(times)

    def stage_devices(self) -> tuple[int, ...]:
        """Id of each pipeline stage's device."""
        return tuple(int(d.id) for d in self.mesh.devices.flat)

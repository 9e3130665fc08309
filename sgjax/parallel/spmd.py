"""The layer-parallel engine: any ``Trainer``'s pipeline schedule as one SPMD program per chunk.

``PipelineEngine`` takes a ``Trainer`` (any chain of stages), a ``BatchSource`` and a
``Schedule`` and is an ``Engine`` of the training loop (``sgjax.training.engine``). Pipeline
stages are placed in contiguous, even groups on the devices of a one-axis mesh, which may span
processes (``jax.distributed``); one compiled program (``sgjax.parallel.schedules``) runs a whole
chunk of ticks, so the host dispatches once per chunk. Evaluation runs the test split through
the stages where they live; the whole state is gathered only for checkpoints and results.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgjax.core.trainer import Trainer
from sgjax.parallel.schedules import (
    BatchSource,
    Program,
    Schedule,
    TickMetrics,
    local_states,
    program_for,
)
from sgjax.parallel.stages import (
    STAGE_AXIS,
    owners,
    pad_rows,
    slots,
    stage_devices,
    stage_mesh,
    unpad_rows,
)
from sgjax.training.engine import ChunkMetrics
from sgjax.training.loop import TrainState

__all__ = ["PipelineEngine", "stage_mesh", "stage_devices"]


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


def _window(valid: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.asarray(values[valid.astype(bool)], np.float32)


class _Placed:
    """A program's compiled chunk on a mesh, with every stage's state in a slot on every
    device (``run_own_stages``) and each device's mailboxes for its own stages (``slots``)."""

    def __init__(self, program: Program, mesh: Mesh, only: int | None = None) -> None:
        self.program, self.mesh, self.only = program, mesh, only
        self.owner = owners(program.num_stages, mesh.devices.size)
        self.sharded = NamedSharding(mesh, PartitionSpec(STAGE_AXIS))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.chunk: jax.stages.Compiled | None = None
        self.traces = 0

    def replicate(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: global_array(x, self.replicated), tree)

    def place(self, tree: Any) -> Any:
        """``tree`` (host values) in a slot on every device: a leading device axis."""
        num = self.mesh.devices.size
        return jax.tree_util.tree_map(
            lambda leaf: global_array(np.stack([np.asarray(leaf)] * num), self.sharded), tree
        )

    def place_mail(self, inflight: Mapping[str, Any]) -> Any:
        """The mailboxes (zeros, or the per-stage values in ``inflight``: [stages, ...]), each
        stage's in its owner's slot (``slots``)."""
        slot, fields = list(slots(self.owner)), self.program.mail_fields

        def placed(name: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
            host = np.zeros((self.mesh.devices.size, max(slot) + 1, *shape), dtype)
            if name in inflight:
                host[list(self.owner), slot] = np.asarray(inflight[name])
            return global_array(host, self.sharded)

        return self.program.mail_type(**{n: placed(n, *f) for n, f in fields.items()})  # bp: ()

    def shard_map(self, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def compile(self, ticks: int, states: Any, mail: Any, data: Any, key: jax.Array) -> None:
        per_device = self.program.chunk_fn(ticks, self.owner, self.only)

        def counted(*args: Any) -> Any:
            self.traces += 1
            return per_device(*args)

        stage, rep = PartitionSpec(STAGE_AXIS), PartitionSpec()
        fn = self.shard_map(counted, (stage, stage, rep, rep, rep, rep), (stage, stage, rep))
        scalar = global_array(np.int32(0), self.replicated)
        args = (states, mail, data, key, scalar, scalar)
        self.chunk = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()

    def run(self, states, mail, data, key, t0: int, stop: int) -> tuple:
        t0 = global_array(np.int32(t0), self.replicated)
        stop = global_array(np.int32(stop), self.replicated)
        return self.chunk(states, mail, data, key, t0, stop)

    def host(self, tree: Any, where: Any) -> Any:
        """``tree``'s values (gathered from every process) on the host, indexed by ``where``."""
        gather = jax.jit(lambda x: x, out_shardings=self.replicated)
        return jax.tree_util.tree_map(lambda a: host_value(gather(a))[where], tree)


class PipelineEngine:
    """A layer-parallel ``schedule`` of ``trainer`` as an ``Engine`` of the training loop.

    ``start`` says where the run continues (its step and batch key), ``inflight`` (as
    ``inflight()`` returned it) the minibatches in flight at that step. Stages are placed on
    ``num_devices`` of ``devices`` (default: every process's; 0: as many as there are, at most
    one per stage).
    """

    def __init__(
        self,
        trainer: Trainer,
        batches: BatchSource,
        start: TrainState,
        schedule: Schedule,
        *,
        num_devices: int = 0,
        devices: Sequence[jax.Device] | None = None,
        inflight: Mapping[str, Any] | None = None,
    ) -> None:
        self.trainer, self.schedule = trainer, schedule
        self.program = program_for(trainer, schedule, batches)
        self.mesh = stage_mesh(self.program.num_stages, num_devices, devices)
        self.placed = _Placed(self.program, self.mesh)
        self.max_chunk = schedule.chunk_steps
        self.host_data = jax.device_get(batches.data)
        self.program.batches = batches._replace(data=self.host_data)
        self.data = self.placed.replicate(self.host_data)
        self._key = start.key
        self.key = self.placed.replicate(jax.device_get(start.key))
        self._done = int(start.step)
        self.tick = self.program.tick_after(self._done)
        self.mail = self.placed.place_mail(inflight or {})
        self.states = self.placed.place(tuple(self.program.split(jax.device_get(start.model))))
        self._evaluate: jax.stages.Compiled | None = None

    @property
    def traces(self) -> int:
        """How many times the chunk program was traced (compiled) in this engine."""
        return self.placed.traces

    def compile(self, chunk_lengths: Collection[int]) -> None:
        """Compile the chunk program (one for every chunk: a fixed number of ticks, a traced
        stop) and the evaluation."""
        del chunk_lengths
        ticks = min(self.max_chunk, self.schedule.num_steps) + self.program.surplus
        self.placed.compile(ticks, self.states, self.mail, self.data, self.key)
        stage, rep = PartitionSpec(STAGE_AXIS), PartitionSpec()
        evaluate = self.placed.shard_map(self._evaluate_fn(), (stage, rep), (rep, rep))
        self._evaluate = jax.jit(evaluate).lower(self.states, self.data).compile()

    def _evaluate_fn(self) -> Callable:
        program, trainer, owner = self.program, self.trainer, self.placed.owner
        num = program.num_stages

        def evaluate(states: Any, data: Any) -> tuple:
            states = local_states(states)
            me = lax.axis_index(STAGE_AXIS)
            x, labels = self.program.batches.test(data)
            rows = x.shape[0]
            zero = jnp.zeros((), jnp.float32)

            def run(k: int, inbox: jax.Array) -> tuple:
                h = x if k == 0 else unpad_rows(inbox, (rows, *program.shapes[k - 1][1:]))
                out = program.stage_eval(k, states[k], h)
                if k < num - 1:
                    return pad_rows(out, program.width), zero, zero
                loss, accuracy = trainer.loss(out, labels), trainer.accuracy(out, labels)
                return jnp.zeros((rows, program.width), jnp.float32), loss, accuracy

            def idle(inbox: jax.Array) -> tuple:
                return jnp.zeros_like(inbox), zero, zero

            inbox = jnp.zeros((rows, program.width), jnp.float32)
            loss = accuracy = zero
            for k in range(num):  # step k: only stage k works, on what stage k - 1 sent
                out, loss_k, accuracy_k = lax.cond(
                    me == owner[k], functools.partial(run, k), idle, inbox
                )
                loss, accuracy = loss + loss_k, accuracy + accuracy_k
                if k < num - 1:
                    move = owner[k] != owner[k + 1]
                    pair = [(owner[k], owner[k + 1])]
                    inbox = lax.ppermute(out, STAGE_AXIS, pair) if move else out
            return lax.psum(loss, STAGE_AXIS), lax.psum(accuracy, STAGE_AXIS)

        return evaluate

    def advance(self, steps: int) -> ChunkMetrics:
        """Run the ticks until the last stage has trained on ``steps`` more minibatches."""
        target = self._done + steps
        stop = self.program.tick_after(target)
        self.states, self.mail, metrics = self.placed.run(
            self.states, self.mail, self.data, self.key, self.tick, stop
        )
        metrics = TickMetrics(*(host_value(m) for m in metrics))
        self.tick, self._done = stop, target
        losses = _window(metrics.loss_valid, metrics.loss)
        accuracies = _window(metrics.loss_valid, metrics.accuracy)
        boundaries = range(len(self.trainer.boundaries))
        aux = [_window(metrics.aux_valid[:, k], metrics.aux_loss[:, k]) for k in boundaries]
        inputs = ()
        if self.trainer.unlocked:  # boundary k's input model: held by stage k + 1
            inputs = tuple(
                float(np.sum(_window(metrics.aux_valid[:, k + 1], metrics.input_loss[:, k + 1])))
                for k in boundaries
            )
        return ChunkMetrics(
            steps,
            steps * float(np.mean(losses)),
            steps * float(np.mean(accuracies)),
            tuple(float(np.sum(values)) for values in aux),
            tuple(len(values) for values in aux),
            inputs,
        )

    def state(self) -> TrainState:
        """The whole state, gathered (every process gets it), on this host's first device."""
        owner = self.placed.owner
        host = [self.placed.host(s, o) for o, s in zip(owner, self.states, strict=True)]
        device = jax.local_devices()[0]
        model = jax.device_put(self.program.join(host), device)
        step = jnp.asarray(self._done, jnp.int32)
        return TrainState(model, step, jax.device_put(self._key, device))

    def evaluate(self) -> tuple[float, float]:
        loss, accuracy = self._evaluate(self.states, self.data)
        return float(host_value(loss)), float(host_value(accuracy))

    def inflight(self) -> dict[str, np.ndarray]:
        """The mailboxes of every stage (from its device), by field: [stages, ...]."""
        if not self.mail:
            return {}
        where = list(self.placed.owner), list(slots(self.placed.owner))
        return dict(self.placed.host(self.mail, where)._asdict())

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's milliseconds per tick (decoupled) or per minibatch (backprop), timed
        alone: the schedule's own program on this process's first device with only that stage
        working, ``repeats`` steady ticks in one compiled chunk (compilation and a warm-up run
        excluded), from the current state. The inputs of the ideal speed-up."""
        schedule = self.schedule._replace(num_steps=2**30)
        batches = self.program.batches
        program = program_for(self.trainer, schedule, batches)
        mesh = Mesh(np.array(jax.local_devices()[:1]), (STAGE_AXIS,))
        model = self.state().model
        times = []
        for k in range(program.num_stages):
            placed = _Placed(program, mesh, only=k)
            data = placed.replicate(self.host_data)
            key = placed.replicate(jax.device_get(self._key))
            split = tuple(program.split(jax.device_get(model)))  # a run takes its buffers:
            fresh = [(placed.place(split), placed.place_mail({})) for _ in range(2)]  # 2 copies
            placed.compile(repeats, *fresh[0], data, key)
            t0 = program.steady_tick
            jax.block_until_ready(placed.run(*fresh[0], data, key, t0, t0 + repeats))
            start = time.perf_counter()
            jax.block_until_ready(placed.run(*fresh[1], data, key, t0, t0 + repeats))
            times.append(1e3 * (time.perf_counter() - start) / repeats)
        return tuple(times)

    def stage_devices(self) -> tuple[int, ...]:
        """Id of each pipeline stage's device."""
        devices = list(self.mesh.devices.flat)
        return tuple(int(devices[o].id) for o in self.placed.owner)

"""What every layer-parallel schedule shares: stages placed on devices, messages between them,
ahead-of-time compilation on a stage's device, bounded asynchronous dispatch, the ideal speed-up.

A *pipeline stage* is what one device step works on: for backprop one of the ``Trainer``'s
stages, for synthetic gradients one of its groups (with its synthesizer). Pipeline stages are
placed on devices in contiguous, even groups.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from sgjax.core.trainer import StageState, Trainer, TrainerState
from sgjax.training.config import ConfigError


class Activations(NamedTuple):
    """What moves forward from stage to stage: a layer's output and the labels of its minibatch."""

    h: jax.Array
    labels: jax.Array


class BatchCursor(NamedTuple):
    """Where the first stage samples from: minibatch ``index`` is drawn with
    ``sample_batch(fold_in(key, index), ...)``, exactly as the single-device loop draws step
    ``index``. Lives on the first stage's device, so sampling needs nothing from the host."""

    key: jax.Array
    index: jax.Array


def indexed_group(
    trainer: Trainer, j: int, stages: tuple[StageState, ...]
) -> dict[int, StageState]:
    """Group ``j``'s stage states keyed by their index in the chain (what the Trainer reads)."""
    return dict(zip(trainer.groups[j], stages, strict=True))


def kept(flag: jax.Array | None, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` is set (or when there is no coin), else ``old``."""
    if flag is None:
        return new
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), new, old)


class WindowMetrics(NamedTuple):
    """Device scalars produced since the last evaluation, not fetched yet.

    ``loss`` and ``accuracy``: one per minibatch the output layer trained on; ``sg_loss``: per
    hidden stage, one per synthetic-gradient module update (empty for backprop);
    ``input_loss``: the complete unlock's, per boundary one per synthetic-input model update (at
    the same ticks as the synthesizers' updates; empty for every other method).
    """

    loss: list[jax.Array]
    accuracy: list[jax.Array]
    sg_loss: tuple[list[jax.Array], ...]
    input_loss: tuple[list[jax.Array], ...] = ()


class Pipeline(Protocol):
    """A layer-parallel schedule driven from the host (``sgjax.parallel.layers.PipelineEngine``
    makes one an ``Engine`` of the training loop)."""

    devices: tuple[jax.Device, ...]
    """The device of every stage (hidden blocks, then the output layer)."""

    def compile(self) -> None:
        """Compile every stage function on its device ahead of time."""

    def advance(self, batches: int) -> WindowMetrics:
        """Dispatch work until the output layer has trained on ``batches`` minibatches (the whole
        run's number also drains the pipeline); returns without waiting for the devices."""

    def block_until_ready(self) -> None:
        """Wait until every stage has finished the work dispatched so far."""

    def model_state(self, device: jax.Device) -> TrainerState:
        """The whole model state (as the single-device step keeps it), copied to ``device``."""

    def inflight(self) -> dict[str, jax.Array]:
        """Minibatches in flight, by name (what a pipeline built with them needs to continue)."""

    def state_devices(self) -> tuple[int, ...]:
        """Id of the device holding each stage's current state (the one its steps ran on)."""

    def stage_ms(self, repeats: int) -> tuple[float, ...]:
        """Each stage's own milliseconds per tick (sg) or per minibatch (bp), timed alone."""


def stage_devices(
    num_stages: int, num_devices: int, devices: Sequence[jax.Device] | None = None
) -> tuple[jax.Device, ...]:
    """Device of each stage: ``num_devices`` of ``devices`` (default: this host's), contiguous
    groups whose sizes differ by at most one; never more devices than stages."""
    available = list(jax.local_devices() if devices is None else devices)
    if not 1 <= num_devices <= len(available):
        raise ConfigError(
            f"--num_devices={num_devices} must be between 1 and the {len(available)} "
            f"{available[0].platform} device(s) available; on the CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python"
        )
    used = min(num_devices, num_stages)
    return tuple(available[stage * used // num_stages] for stage in range(num_stages))


def device_groups(device_ids: Sequence[int]) -> list[list[int]]:
    """Stage indices grouped by device (given each stage's device id), in order of first use."""
    groups: dict[int, list[int]] = {}
    for stage, device in enumerate(device_ids):
        groups.setdefault(device, []).append(stage)
    return list(groups.values())


def device_id_of(tree: Any) -> int:
    """Id of the one device holding every array of ``tree`` (ValueError if several)."""
    devices = {d for leaf in jax.tree_util.tree_leaves(tree) for d in leaf.devices()}
    if len(devices) != 1:
        raise ValueError(f"expected one device, found {sorted(d.id for d in devices)}")
    return devices.pop().id


def abstract_on(tree: Any, device: jax.Device) -> Any:
    """Shapes and dtypes of ``tree``'s arrays, committed to ``device`` (for lowering)."""
    sharding = SingleDeviceSharding(device)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


class StageCompiler:
    """Lowers and compiles stage functions ahead of time, once per name and device.

    A compiled function runs on the device its arguments were committed to when it was lowered
    (and refuses arguments on another device), so placement is explicit.
    """

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, int], jax.stages.Compiled] = {}

    def __call__(
        self, name: str, device: jax.Device, fn: Callable[..., Any], *args: Any
    ) -> jax.stages.Compiled:
        key = (name, device.id)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(fn).lower(*args).compile()
        return self._compiled[key]


class DispatchWindow:
    """Bounds how far the host runs ahead of the devices.

    Dispatch is asynchronous; without a bound the host would queue thousands of ticks (and
    their buffers) between evaluations. After each tick the host waits for the tick ``limit``
    ticks back, which leaves ``limit`` ticks queued on the devices: enough to keep them busy.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._ticks: collections.deque[list[jax.Array]] = collections.deque()

    def push(self, outputs: list[jax.Array]) -> None:
        """Record one output of each call of a tick; wait for the oldest tick when over limit."""
        self._ticks.append(outputs)
        while len(self._ticks) > self.limit:
            jax.block_until_ready(self._ticks.popleft())


def time_chain(step: Callable[[Any], Any], state: Any, repeats: int) -> float:
    """Milliseconds per call of ``state = step(state)``, after one warm-up call.

    Each call depends on the previous one, as a stage's ticks do, so calls cannot overlap.
    """
    state = jax.block_until_ready(step(state))
    start = time.perf_counter()
    for _ in range(repeats):
        state = step(state)
    jax.block_until_ready(state)
    return 1e3 * (time.perf_counter() - start) / repeats


def ideal_speedup(
    stage_ms: Sequence[float], device_ids: Sequence[int], microbatches: int | None
) -> float:
    """Speed-up over running every stage on one device, if devices overlapped perfectly and
    transfers and dispatch were free, from each stage's own time.

    Device loads are the summed times of their stages; S is their sum and B the busiest load.
    ``microbatches=None`` (the synthetic-gradient pipeline, every stage busy every tick): S / B.
    Backprop with M microbatches (GPipe; M = 1 is plain model parallelism): M microbatches pass
    the devices like identical jobs through a flow shop, S / M + (M - 1) B / M per minibatch, so
    M S / (S + (M - 1) B): exactly 1 for M = 1, towards S / B as M grows.
    """
    loads = [sum(stage_ms[s] for s in group) for group in device_groups(device_ids)]
    total, busiest = sum(loads), max(loads)
    if microbatches is None:
        return total / busiest
    return microbatches * total / (total + (microbatches - 1) * busiest)


def zeros_on(shape: tuple[int, ...], dtype: Any, device: jax.Device) -> jax.Array:
    """An array of zeros created on ``device``."""
    return jnp.zeros(shape, dtype, device=device)

"""What every layer-parallel schedule shares: pipeline stages placed on the devices of a one-axis
mesh, the messages between them, and the ideal speed-up. A *pipeline stage* is one of the
``Trainer``'s stages (backprop) or groups (decoupled); they are placed on devices in contiguous,
even groups, and a device runs all of its stages every tick."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from sgjax.core.trainer import StageState, Trainer, tree_where
from sgjax.training.config import ConfigError

STAGE_AXIS = "stages"


def stage_devices(
    num_stages: int, num_devices: int, devices: Sequence[jax.Device] | None = None
) -> tuple[jax.Device, ...]:
    """Device of each stage: ``num_devices`` of ``devices`` (default: every process's), in
    contiguous groups whose sizes differ by at most one; never more devices than stages."""
    available = list(jax.devices() if devices is None else devices)
    if not 1 <= num_devices <= len(available):
        raise ConfigError(
            f"--num_devices={num_devices} must be between 1 and the {len(available)} "
            f"{available[0].platform} device(s) available; on the CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python"
        )
    used = min(num_devices, num_stages)
    return tuple(available[stage * used // num_stages] for stage in range(num_stages))


def stage_mesh(
    num_stages: int, num_devices: int, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The one-axis mesh of the devices that ``stage_devices`` uses, in stage order
    (``num_devices=0``: as many as there are, at most one per stage)."""
    if num_devices == 0:
        num_devices = min(len(jax.devices() if devices is None else devices), num_stages)
    placed = stage_devices(num_stages, num_devices, devices)
    return Mesh(np.array(list(dict.fromkeys(placed))), (STAGE_AXIS,))


def owners(num_stages: int, num_devices: int) -> tuple[int, ...]:
    """Index on the mesh axis of each stage's device (as ``stage_devices`` places them)."""
    return tuple(stage * num_devices // num_stages for stage in range(num_stages))


def slots(owner: Sequence[int]) -> tuple[int, ...]:
    """Each stage's place among its device's stages: a device keeps mailboxes for these."""
    return tuple(k - list(owner).index(o) for k, o in enumerate(owner))


def device_groups(device_ids: Sequence[int]) -> list[list[int]]:
    """Stage indices grouped by device (given each stage's device id), in order of first use."""
    groups: dict[int, list[int]] = {}
    for stage, device in enumerate(device_ids):
        groups.setdefault(device, []).append(stage)
    return list(groups.values())


def ideal_speedup(
    stage_ms: Sequence[float], device_ids: Sequence[int], microbatches: int | None
) -> float:
    """Speed-up over one device with perfect overlap and free transfers, from each stage's time.
    S: the sum of the device loads, B: the busiest. Decoupled (``microbatches=None``): S / B.
    Backprop with M microbatches (GPipe; M = 1: model parallel) passes the devices like identical
    jobs through a flow shop: M S / (S + (M - 1) B), 1 for M = 1, towards S / B as M grows."""
    loads = [sum(stage_ms[s] for s in group) for group in device_groups(device_ids)]
    total, busiest = sum(loads), max(loads)
    if microbatches is None:
        return total / busiest
    return microbatches * total / (total + (microbatches - 1) * busiest)


# --------------------------------------------------------------------------- group helpers


def indexed_group(
    trainer: Trainer, j: int, stages: tuple[StageState, ...]
) -> dict[int, StageState]:
    """Group ``j``'s stage states keyed by their index in the chain (what the Trainer reads)."""
    return dict(zip(trainer.groups[j], stages, strict=True))


def kept(flag: jax.Array | None, new: Any, old: Any) -> Any:
    """``new`` where ``flag`` is set (or when there is no flag), else ``old``."""
    return new if flag is None else tree_where(flag, new, old)


# --------------------------------------------------------------------------- inside a program


def run_own_stages(
    me: jax.Array,
    owner: Sequence[int],
    branches: Sequence[Callable],
    states: Sequence[Any],
    *args: Any,
    extras: Sequence[Any] | None = None,
    only: int | None = None,
) -> tuple[tuple, list]:
    """Each device runs ``branches[k](states[k], extras[k], *args)`` for every stage ``k`` it
    owns (``owner[k]``: its index on the mesh axis), keeps the other states, and outputs zeros
    for them; ``only``: no other stage runs. One ``lax.cond`` per stage state lets XLA update it
    in place (a ``lax.switch`` over packed states copied them: 1.1-1.8x slower); the price: every
    device holds a slot for every stage's state (only its own are used); messages go ``by_slot``."""
    extras = [None] * len(branches) if extras is None else extras
    new_states, outputs = [], []
    for k, branch in enumerate(branches):

        def skip(state: Any, extra: Any, *rest: Any, branch: Callable = branch) -> tuple:
            shapes = jax.eval_shape(branch, state, extra, *rest)[1]
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            return state, zeros

        mine = (me == owner[k]) & (only is None or only == k)
        state, out = lax.cond(mine, branch, skip, states[k], extras[k], *args)
        new_states.append(state)
        outputs.append(out)
    return tuple(new_states), outputs


def _pick(me: jax.Array, owner: Sequence[int], stages: Sequence[int], value: Callable) -> Any:
    """``value(k)`` on the device of each of ``stages`` (the first one's on the others)."""
    picked = value(stages[0])
    for k in stages[1:]:
        if value(k) is not picked:
            picked = jnp.where(me == owner[k], value(k), picked)
    return picked


def by_slot(me: jax.Array, owner: Sequence[int], values: Sequence[jax.Array]) -> list:
    """Per-stage ``values`` (zeros where a device does not own the stage, as ``run_own_stages``
    returns them) as one value per device slot (``slots``): each device's own stages'."""
    slot = slots(owner)
    return [
        _pick(me, owner, [k for k in range(len(owner)) if slot[k] == j], values.__getitem__)
        for j in range(max(slot) + 1)
    ]


def shifted(
    me: jax.Array, owner: Sequence[int], values: Sequence[jax.Array], step: int
) -> list[jax.Array]:
    """What each device slot receives when stage k sends its slot's value (``values``, per
    slot) to stage k + ``step`` (+1: up, -1: down); zeros (or any value) for a slot no message
    is for. Between stages of one device the value stays; between devices one ``lax.ppermute``
    carries every crossing message (each device sends at most one way: its groups are
    contiguous)."""
    num, slot = len(owner), slots(owner)
    senders = [k for k in range(num) if 0 <= k + step < num]
    crossing = [k for k in senders if owner[k] != owner[k + step]]
    if crossing:
        payload = _pick(me, owner, crossing, lambda k: values[slot[k]])
        pairs = [(owner[k], owner[k + step]) for k in crossing]
        got = lax.ppermute(payload, STAGE_AXIS, pairs)
    source = lambda r: got if r - step in crossing else values[slot[r - step]]  # noqa: E731
    into = [[k + step for k in senders if slot[k + step] == j] for j in range(len(values))]
    return [_pick(me, owner, r, source) if r else jnp.zeros_like(values[0]) for r in into]


def pad_rows(h: jax.Array, width: int) -> jax.Array:
    """``h`` flattened per example and padded with zeros to ``width`` features."""
    flat = h.reshape(h.shape[0], -1)
    return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def unpad_rows(padded: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of ``pad_rows`` for an activation of ``shape``."""
    return padded[..., : math.prod(shape[1:])].reshape(shape)


def with_labels(h: jax.Array, labels: jax.Array) -> jax.Array:
    """``h`` and its labels bit-cast into a float32 column: one collective carries both."""
    return jnp.concatenate([h, lax.bitcast_convert_type(labels, jnp.float32)[:, None]], axis=1)


def without_labels(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of ``with_labels``."""
    return packed[:, :-1], lax.bitcast_convert_type(packed[:, -1], jnp.int32)

"""Copy and Repeat Copy (Graves et al. 2014), generated on the device inside the compiled loop.

For N random ``bits``-bit vectors: step 0 sets the start channel (``bits``), steps 1..N carry
the pattern, step N+1 the delimiter (``bits + 1``; Repeat Copy: R * 0.1 on ``bits + 2``). The
output phase (the only steps the loss counts) repeats the pattern (R times and an end marker on
output channel ``bits`` for Repeat Copy). Episodes are padded to ``max_length`` steps, so the
compiled program never changes as N and R grow."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

COPY_TASKS = ("copy", "repeat_copy")
DEFAULT_BITS = 8
SOLVED_BITS_PER_ELEMENT = 0.15  # the curriculum advances below this mean error
REPEAT_INPUT_SCALE = 0.1


class Level(NamedTuple):
    """A curriculum level: pattern length N and repeats R (1 for Copy); int32 scalars."""

    n: jax.Array
    r: jax.Array


class Episode(NamedTuple):
    """A batch of episodes of one level, time-major and padded to ``max_length`` steps."""

    inputs: jax.Array  # [max_length, batch, input_dim]
    targets: jax.Array  # [max_length, batch, output_dim]
    mask: jax.Array  # [max_length, batch]: 1 on the output phase
    length: jax.Array  # steps in the episode (int32); the rest is padding


@dataclasses.dataclass(frozen=True)
class CopyTask:
    """Copy (``name="copy"``) or Repeat Copy (``"repeat_copy"``) padded to ``max_length``."""

    name: str
    max_length: int
    bits: int = DEFAULT_BITS

    def __post_init__(self) -> None:
        if self.name not in COPY_TASKS:
            raise ValueError(f"task {self.name!r} must be one of {', '.join(COPY_TASKS)}")
        if self.bits <= 0:
            raise ValueError(f"bits={self.bits} must be a positive integer")
        first = self.steps(1, 1)
        if self.max_length < first:
            raise ValueError(
                f"max_length={self.max_length} is shorter than the first level's episode "
                f"({first} steps); use at least {first}"
            )

    @property
    def repeats(self) -> bool:
        return self.name == "repeat_copy"

    @property
    def input_dim(self) -> int:
        return self.bits + 2 + int(self.repeats)

    @property
    def output_dim(self) -> int:
        return self.bits + int(self.repeats)

    def first_level(self) -> Level:
        return Level(jnp.ones((), jnp.int32), jnp.ones((), jnp.int32))

    def steps(self, n: jax.Array | int, r: jax.Array | int) -> jax.Array | int:
        return n + 2 + n * r + 1 if self.repeats else 2 * n + 2

    def episode_size(self, level: Level) -> jax.Array:
        """The paper's episode length of a level: N + 3 (Copy), N*R + 3 (Repeat Copy)."""
        return level.n * level.r + 3

    def next_level(self, level: Level) -> Level:
        """Copy: N += 1; Repeat Copy: alternately N += 1 and R += 1 (N first)."""
        if not self.repeats:
            return Level(level.n + 1, level.r)
        grow_n = level.n == level.r
        return Level(level.n + grow_n, level.r + (1 - grow_n))

    def fits(self, level: Level) -> jax.Array:
        return self.steps(level.n, level.r) <= self.max_length

    def generate(self, key: jax.Array, level: Level, batch_size: int) -> Episode:
        """A batch of episodes of ``level`` with random patterns (traceable in ``level``)."""
        n, r, length = level.n, level.r, self.max_length
        pattern = jax.random.bernoulli(key, 0.5, (length, batch_size, self.bits))
        pattern = pattern.astype(jnp.float32)
        t = jnp.arange(length)
        is_data = (t >= 1) & (t <= n)
        out_start = n + 2
        is_out = (t >= out_start) & (t < out_start + n * r)
        data = pattern[jnp.clip(t - 1, 0, length - 1)] * is_data[:, None, None]
        copied = pattern[jnp.clip((t - out_start) % jnp.maximum(n, 1), 0, length - 1)]
        copied = copied * is_out[:, None, None]
        flags = [(t == 0), (t == n + 1)]
        if self.repeats:
            flags.append((t == n + 1) * (r * REPEAT_INPUT_SCALE))
        flag_channels = jnp.stack([f.astype(jnp.float32) for f in flags], axis=-1)
        inputs = jnp.concatenate(
            [data, jnp.broadcast_to(flag_channels[:, None], (length, batch_size, len(flags)))],
            axis=-1,
        )
        targets = copied
        is_end = jnp.zeros_like(is_out)
        if self.repeats:
            is_end = t == out_start + n * r
            end_channel = jnp.broadcast_to(
                is_end[:, None, None].astype(jnp.float32), (length, batch_size, 1)
            )
            targets = jnp.concatenate([copied, end_channel], axis=-1)
        mask = jnp.broadcast_to((is_out | is_end)[:, None], (length, batch_size))
        steps = jnp.asarray(self.steps(n, r), jnp.int32)
        return Episode(inputs, targets, mask.astype(jnp.float32), steps)


def bit_errors(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Wrong output bits (logit > 0 read as 1) summed over the masked steps, per example."""
    wrong = ((logits > 0).astype(jnp.float32) != targets).astype(jnp.float32)
    return jnp.sum(jnp.sum(wrong, axis=-1) * mask, axis=0)


def sigmoid_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Each example's cross-entropy in nats, summed over the output channels."""
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

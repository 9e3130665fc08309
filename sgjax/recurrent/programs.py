"""Compiled recurrent programs, an update per segment of ``truncation`` steps scanned in chunks:
copy tasks (episodes and curriculum on the device), char_lm (parallel streams over a text)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax.core.methods import backprop, dni
from sgjax.core.optim import adam
from sgjax.core.recurrent import Carry, RecurrentState, RecurrentTrainer, Segment, StepLoss
from sgjax.core.synthesizers import dense
from sgjax.core.trainer import tree_where
from sgjax.models.lstm import LSTMCore, zero_carry
from sgjax.recurrent.config import RNNConfig
from sgjax.tasks.copy import SOLVED_BITS_PER_ELEMENT, CopyTask, Episode, Level, bit_errors
from sgjax.tasks.copy import sigmoid_loss as copy_loss

LN2 = math.log(2.0)
FORGET_BIAS = tuple(map(jax.tree_util.DictKey, ("core", "lstm", "hf", "bias")))


def make_trainer(
    config: RNNConfig, output_dim: int, loss: StepLoss, unroll: int | bool = 1
) -> RecurrentTrainer:
    """The LSTM core of ``config`` trained with its mode, Adam at its learning rate (M's own)."""
    units = config.synthesizer_units or config.hidden_units
    method = backprop() if config.mode == "bptt" else dni(dense(1, units))
    optimizer = adam(config.learning_rate)
    if config.synthesizer_learning_rate or config.clip_norm:  # M's own Adam; each one clipped
        clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity()
        rates = {"core": config.learning_rate, "synthesizer": config.synthesizer_learning_rate}
        optimizer = optax.multi_transform(
            {k: optax.chain(clip, adam(rate or config.learning_rate)) for k, rate in rates.items()},
            lambda params: {k: "synthesizer" if k == "synthesizer" else "core" for k in params},
        )
    return RecurrentTrainer(
        LSTMCore(config.hidden_units, output_dim), method, loss, optimizer,
        sg_scale=config.sg_scale, sg_trains_core=config.sg_trains_core,
        aux_weight=1.0 if config.mode == "dni_aux" else 0.0, unscaled_target=config.unscaled_target,
        unroll=unroll,
    )  # fmt: skip


class ChunkStats(NamedTuple):  # sums over a chunk's updates
    loss_sum: jax.Array
    count: jax.Array
    sg_loss: jax.Array
    aux_loss: jax.Array


class Chunked:
    """``chunk(n)``: ``n`` of a program's ``step(state, data)`` in one ``lax.scan``, summed."""

    def chunk(self, num_steps: int) -> Callable[[Any, Any], tuple[Any, ChunkStats]]:
        def run(state: Any, data: Any = None) -> tuple[Any, ChunkStats]:
            step = lambda s, _: self.step(s, data)  # noqa: E731
            state, per_step = jax.lax.scan(step, state, None, length=num_steps)
            return state, ChunkStats(*(jnp.sum(x, axis=0) for x in per_step))

        return run

    def _init_model(self, key: jax.Array, carry: Carry, x: jax.Array) -> RecurrentState:
        """The trainer's initial state, ``forget_bias`` added to the LSTM's forget-gate bias."""
        model, bias = self.trainer.init(key, carry, x), self.config.forget_bias
        hf = lambda path, x: x + bias if path == FORGET_BIAS else x  # noqa: E731
        return model._replace(params=jax.tree_util.tree_map_with_path(hf, model.params))

    def _update(self, state: Any, segment: Segment, before: Callable, continues: jax.Array):
        """The trainer's step on ``segment``; with ``sg_trains_core`` also on the segment
        before it (``before(start)``), present unless this one starts the stream."""
        batch = continues.shape[0]
        previous = None
        if self.config.sg_trains_core:
            start = jnp.maximum(state.position - self.config.truncation, 0)
            present = jnp.broadcast_to(state.position > 0, (batch,))
            previous = (state.previous_carry, before(start), present)
        model, end, metrics = self.trainer.step(
            state.model, state.carry, segment, continues, previous
        )
        stats = ChunkStats(metrics.loss_sum, metrics.count, metrics.sg_loss, metrics.aux_loss)
        return model, end, metrics, stats


# ---------------------------------------------------------------- copy and repeat copy


class CopyRunState(NamedTuple):  # everything that changes in a copy-task run
    model: RecurrentState
    carry: Carry
    previous_carry: Carry  # at the start of the previous segment (sg_trains_core)
    episode: Episode
    position: jax.Array  # time step where the next segment starts
    level: Level
    error_bits: jax.Array  # wrong bits so far in the current episodes
    elements: jax.Array  # output elements (time steps x batch) so far in them
    last_error: jax.Array  # bits per element of the last finished episodes (NaN before)
    solved: jax.Array  # largest episode size solved so far (0: none)
    solved_steps: jax.Array  # the update at which the k-th level was solved (-1: not yet)
    levels_solved: jax.Array
    episodes: jax.Array
    step: jax.Array
    key: jax.Array


def level_count(task: CopyTask) -> int:
    """How many curriculum levels fit in ``task.max_length`` (plain integers: host only)."""
    level, count = Level(1, 1), 0
    while task.steps(level.n, level.r) <= task.max_length:
        count += 1
        level = task.next_level(level)
    return count


def level_sizes(task: CopyTask, count: int) -> list[int]:
    """The paper's episode sizes of the first ``count`` levels."""
    level, sizes = Level(1, 1), []
    for _ in range(count):
        sizes.append(int(task.episode_size(level)))
        level = task.next_level(level)
    return sizes


class CopyProgram(Chunked):
    """Copy or Repeat Copy under ``config``: ``init(seed)`` and ``chunk(n)`` are pure.
    ``unroll``: the segment's ``lax.scan`` unroll (``True`` to count FLOPs per step)."""

    def __init__(self, config: RNNConfig, unroll: int | bool = 1) -> None:
        self.config = config
        self.task = config.copy_task
        self.trainer = make_trainer(config, self.task.output_dim, copy_loss, unroll)
        truncation = config.truncation
        self.padded_length = -(-self.task.max_length // truncation) * truncation
        self.levels = level_count(self.task)

    def _episode(self, key: jax.Array, level: Level) -> Episode:
        episode = self.task.generate(key, level, self.config.batch_size)
        extra = self.padded_length - self.task.max_length
        if extra:
            pad = lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
            episode = episode._replace(
                inputs=pad(episode.inputs), targets=pad(episode.targets), mask=pad(episode.mask)
            )
        return episode

    def init(self, seed: int | jax.Array) -> CopyRunState:
        config = self.config
        init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
        carry = zero_carry(config.batch_size, config.hidden_units)
        level = self.task.first_level()
        episode = self._episode(jax.random.fold_in(data_key, 0), level)
        model = self._init_model(init_key, carry, episode.inputs[0])
        zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        return CopyRunState(
            model, carry, carry, episode, zero_i, level, zero_f, zero_f,
            jnp.full((), jnp.nan, jnp.float32), zero_i,
            jnp.full((self.levels + 1,), -1, jnp.int32), zero_i, zero_i, zero_i, data_key,
        )  # fmt: skip

    def step(self, state: CopyRunState, data: Any = None) -> tuple[CopyRunState, ChunkStats]:
        del data  # the episodes are generated on the device
        config, task, truncation = self.config, self.task, self.config.truncation
        batch, episode = config.batch_size, state.episode
        arrays = (episode.inputs, episode.targets, episode.mask)

        def cut(start: jax.Array) -> Segment:
            return Segment(*(jax.lax.dynamic_slice_in_dim(a, start, truncation) for a in arrays))

        segment = cut(state.position)
        continues = jnp.broadcast_to(state.position + truncation < episode.length, (batch,))
        model, end, metrics, stats = self._update(state, segment, cut, continues)
        error_bits = state.error_bits + jnp.sum(
            bit_errors(metrics.outputs, segment.targets, segment.mask)
        )
        elements = state.elements + metrics.count
        position = state.position + truncation
        done = position >= episode.length
        error = error_bits / jnp.maximum(elements, 1.0)
        size = task.episode_size(state.level)
        solved_now = done & (error < SOLVED_BITS_PER_ELEMENT) & (size > state.solved)
        index = jnp.minimum(state.levels_solved, self.levels)
        solved_steps = state.solved_steps.at[index].set(
            jnp.where(solved_now, state.step + 1, state.solved_steps[index])
        )
        following = task.next_level(state.level)
        level = tree_where(solved_now & task.fits(following), following, state.level)
        episodes = state.episodes + done.astype(jnp.int32)
        episode = jax.lax.cond(
            done,
            lambda: self._episode(jax.random.fold_in(state.key, episodes), level),
            lambda: episode,
        )
        zero = zero_carry(batch, config.hidden_units)
        new_state = CopyRunState(
            model=model, carry=tree_where(done, zero, end),
            previous_carry=tree_where(done, zero, state.carry), episode=episode,
            position=jnp.where(done, 0, position), level=level,
            error_bits=jnp.where(done, 0.0, error_bits), elements=jnp.where(done, 0.0, elements),
            last_error=jnp.where(done, error, state.last_error),
            solved=jnp.where(solved_now, size, state.solved), solved_steps=solved_steps,
            levels_solved=state.levels_solved + solved_now.astype(jnp.int32), episodes=episodes,
            step=state.step + 1, key=state.key,
        )  # fmt: skip
        return new_state, stats


# ---------------------------------------------------------------- character language modelling


class TextRunState(NamedTuple):
    model: RecurrentState
    carry: Carry
    previous_carry: Carry
    position: jax.Array  # where the next segment starts in every stream
    step: jax.Array


def char_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _text_segment(streams: jax.Array, start: jax.Array, length: int, vocab: int) -> Segment:
    ids = jax.lax.dynamic_slice_in_dim(streams, start, length + 1, axis=1).T  # [T+1, B]
    inputs = jax.nn.one_hot(ids[:-1], vocab, dtype=jnp.float32)
    return Segment(inputs, ids[1:], jnp.ones(ids[1:].shape, jnp.float32))


class TextProgram(Chunked):
    """Character language modelling: ``batch_size`` parallel streams of the training text,
    one segment of each per update; the state carries over, and restarts where the text does."""

    def __init__(self, config: RNNConfig, vocab_size: int) -> None:
        self.config, self.vocab_size = config, vocab_size
        self.trainer = make_trainer(config, vocab_size, char_loss)

    def init(self, seed: int | jax.Array) -> TextRunState:
        config = self.config
        carry = zero_carry(config.batch_size, config.hidden_units)
        x = jnp.zeros((config.batch_size, self.vocab_size), jnp.float32)
        model = self._init_model(jax.random.PRNGKey(seed), carry, x)
        zero = jnp.zeros((), jnp.int32)
        return TextRunState(model, carry, carry, zero, zero)

    def step(self, state: TextRunState, streams: jax.Array) -> tuple[TextRunState, ChunkStats]:
        config, truncation = self.config, self.config.truncation
        batch, length = streams.shape
        cut = lambda start: _text_segment(streams, start, truncation, self.vocab_size)  # noqa: E731
        continues = jnp.broadcast_to(state.position + 2 * truncation + 1 <= length, (batch,))
        model, end, metrics, stats = self._update(state, cut(state.position), cut, continues)
        position = state.position + truncation
        wrap = position + truncation + 1 > length
        zero = zero_carry(batch, config.hidden_units)
        carries = (tree_where(wrap, zero, end), tree_where(wrap, zero, state.carry))
        return TextRunState(model, *carries, jnp.where(wrap, 0, position), state.step + 1), stats

    def bits_per_character(self, state: TextRunState, streams: jax.Array) -> jax.Array:
        """On ``streams`` ([streams, length]), each read whole."""
        batch, length = streams.shape
        carry = zero_carry(batch, self.config.hidden_units)
        segment = _text_segment(streams, jnp.zeros((), jnp.int32), length - 1, self.vocab_size)
        (loss_sum, _), (count, _) = self.trainer.unroll(state.model.params["core"], carry, segment)
        return loss_sum / count / LN2

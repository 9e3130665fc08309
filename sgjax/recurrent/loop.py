"""A recurrent run as an ``Engine`` for ``sgjax.training.loop.run_engine``: its records, the
curriculum or the validation score at each record, and early stopping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.text import TextCorpus, as_streams
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.programs import LN2, CopyProgram, TextProgram, level_sizes
from sgjax.tasks.copy import CopyTask
from sgjax.training.architecture import byte_count, value_count
from sgjax.training.config import ConfigError
from sgjax.training.engine import ChunkMetrics
from sgjax.training.loop import (
    ChunkedEngine,
    PeriodMetrics,
    Recording,
    Resume,
    RunResult,
    SaveCheckpoint,
    run_engine,
)


@dataclasses.dataclass(frozen=True)
class RNNRecord:
    """One row of metrics.csv: training means over the period, the task's scores at its end."""

    step: int
    train_bits: float  # per output element (copy tasks) or character (char_lm)
    sg_loss: float
    aux_loss: float
    level: tuple[int, int] | None = None  # copy tasks: the curriculum's (N, R)
    episode_error: float | None = None  # copy tasks: in the last finished episodes
    max_episode_solved: int | None = None
    valid_bpc: float | None = None
    test_bpc: float | None = None
    elapsed_s: float = 0.0

    def text(self) -> str:
        line = f"train {self.train_bits:.4f} bits"
        if self.level is not None:
            n, r = self.level
            error = "-" if self.episode_error is None else f"{self.episode_error:.3f}"
            line += (
                f" | level N={n} R={r} error {error} bits/element | largest solved "
                f"{self.max_episode_solved}"
            )
        if self.valid_bpc is not None:
            line += f" | valid {self.valid_bpc:.4f} test {self.test_bpc:.4f} bpc"
        if self.sg_loss:
            line += f" | sg loss {self.sg_loss:.3e}"
        return line

    def cells(self) -> dict[str, str]:
        values = dataclasses.asdict(self)
        values["level_n"], values["level_r"] = values.pop("level") or (None, None)
        return {
            name: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
            for name, v in values.items()
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RNNRecord:
        return cls(**(saved | {"level": tuple(saved["level"]) if saved["level"] else None}))


class Scores(NamedTuple):  # the best validation point of a char_lm run (early stopping)
    best_valid_bpc: float | None
    best_step: int | None
    test_bpc: float | None
    validations_since_best: int


def char_lm_scores(records: list[RNNRecord]) -> Scores:
    """The best validation record and the test bits per character there."""
    best, since = None, 0
    for record in (r for r in records if r.valid_bpc is not None):
        if best is None or record.valid_bpc < best.valid_bpc:
            best, since = record, 0
        else:
            since += 1
    if best is None:
        return Scores(None, None, None, 0)
    return Scores(best.valid_bpc, best.step, best.test_bpc, since)


def program_for(config: RNNConfig, corpus: TextCorpus | None) -> CopyProgram | TextProgram:
    return (
        CopyProgram(config) if config.task != "char_lm" else TextProgram(config, corpus.vocab_size)
    )


def state_template(config: RNNConfig, corpus: TextCorpus | None) -> Any:  # to restore into
    program = program_for(config, corpus)  # built outside the trace: it reads the levels
    return jax.eval_shape(lambda: program.init(config.seed))


def estimated_bytes(config: RNNConfig, corpus: TextCorpus | None) -> int:
    """Rough device memory of a run, read off the program's state (``jax.eval_shape``: nothing
    allocated): the state (parameters, Adam moments, carries, a copy task's episodes), one
    gradient per parameter, and a segment's activations (per step, 6 values per carry element:
    the gates, cell and output with their gradients; the logits and their gradients)."""
    program = program_for(config, corpus)
    state = jax.eval_shape(lambda: program.init(config.seed))
    logits = config.batch_size * program.trainer.core.output_dim
    activations = config.truncation * (6 * value_count(state.carry) + 2 * logits)
    return byte_count(state) + 4 * value_count(state.model.params) + 4 * activations


def text_streams(config: RNNConfig, corpus: TextCorpus) -> dict[str, np.ndarray]:
    """Training streams (``batch_size``) and evaluation streams; ConfigError: text too short."""
    train = as_streams(corpus.train, config.batch_size)
    if train.shape[1] < 2 * config.truncation + 1:
        need = config.batch_size * (2 * config.truncation + 1)
        raise ConfigError(
            f"the training text has {len(corpus.train)} characters, fewer than --batch_size x "
            f"(2 x --truncation + 1) = {need}; use a longer text or a smaller --batch_size"
        )
    out = {"train": train}
    for name in ("valid", "test"):
        ids = getattr(corpus, name)
        # Long enough streams that the state matters; at most one per training stream.
        streams = max(1, min(config.batch_size, len(ids) // 64))
        out[name] = as_streams(ids, streams)
        if out[name].shape[1] < 2:
            raise ConfigError(
                f"the {name} text has {len(ids)} characters; it needs at least 2 to be scored"
            )
    return out


def text_identity(corpus: TextCorpus | None) -> dict[str, Any]:
    """What a resumed char_lm run must match of its texts (their sizes; the files may move)."""
    if corpus is None:
        return {}
    sizes = [len(t) for t in (corpus.train, corpus.valid, corpus.test)]
    return {"text_sizes": sizes, "vocab_size": corpus.vocab_size}


def curriculum_curve(task: CopyTask, state: Any) -> list[tuple[int, int]]:
    """(update, episode size) of every level solved so far."""
    steps = [int(s) for s in np.asarray(jax.device_get(state.solved_steps)) if s >= 0]
    return list(zip(steps, level_sizes(task, len(steps)), strict=True))


class RecurrentEngine(ChunkedEngine):
    """A recurrent program as an ``Engine``; its evaluation is the task's scores. Its
    ``ChunkMetrics.loss`` sums over output elements, counted in ``extra["count"]``."""

    def __init__(self, program, streams: dict[str, np.ndarray], state: Any, max_chunk: int) -> None:
        self.texts = {name: jnp.asarray(a) for name, a in streams.items()}
        super().__init__(program.chunk, self.texts.get("train"), state, max_chunk)
        self.program = program
        self._scores: dict[str, jax.stages.Compiled] = {}

    def compile(self, chunk_lengths: Collection[int]) -> None:
        super().compile(chunk_lengths)
        if isinstance(self.program, TextProgram):
            score = jax.jit(self.program.bits_per_character)
            self._scores = {
                name: score.lower(self._state, self.texts[name]).compile()
                for name in ("valid", "test")
            }

    def advance(self, steps: int) -> ChunkMetrics:
        loss, count, sg_loss, aux_loss = (float(x) for x in self.run(steps))
        extra = {"count": count, "aux_loss": aux_loss}
        return ChunkMetrics(steps, loss, 0.0, (sg_loss,), extra=extra)

    def evaluate(self) -> dict[str, Any]:
        state, scores = self._state, self._scores.items()
        if self._scores:
            return {f"{name}_bpc": float(score(state, self.texts[name])) for name, score in scores}
        error = float(state.last_error)
        return {
            "level": tuple(int(x) for x in jax.device_get(state.level)),
            "episode_error": error if math.isfinite(error) else None,
            "max_episode_solved": int(state.solved),
        }


def _record(step: int, period: PeriodMetrics, scores: dict[str, Any]) -> RNNRecord:
    count = period.extra.get("count", 0.0)
    return RNNRecord(
        step=step, train_bits=period.loss / count / LN2 if count else math.nan,
        sg_loss=period.sg_loss[0] / max(period.steps, 1),
        aux_loss=period.extra["aux_loss"] / max(period.steps, 1), **scores,
    )  # fmt: skip


def _chunk_text(chunk: ChunkMetrics) -> str:
    count = chunk.extra["count"]
    bits = chunk.loss / count / LN2 if count else math.nan
    return f"train {bits:.4f} bits (last chunk)"


def _divergence(period: PeriodMetrics, step: int) -> str:
    finite = math.isfinite(period.loss) and math.isfinite(period.sg_loss[0])
    return "" if finite else f"training loss became non-finite by step {step}"


def train_recurrent(
    config: RNNConfig,
    corpus: TextCorpus | None = None,
    *,
    on_record: Callable[[RNNRecord], None] | None = None,
    log: Callable[[str], None] = print,
    start: Resume | None = None,
    save_checkpoint: SaveCheckpoint | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Run ``config`` (``corpus``: char_lm's, which stops after ``patience`` worse validations)."""
    program = program_for(config, corpus)
    streams = text_streams(config, corpus) if config.task == "char_lm" else {}
    if start is None:
        start = Resume(jax.jit(program.init)(config.seed), [], PeriodMetrics(), 0.0, 0.0)
    engine = RecurrentEngine(program, streams, start.state, config.chunk_steps)

    def stop_early(records: list[RNNRecord]) -> str:
        if config.task != "char_lm" or not config.patience:
            return ""
        waited = char_lm_scores(records).validations_since_best >= config.patience
        return f"stopped early after {config.patience} validations without improvement" * waited

    recording = Recording(_record, _chunk_text, _divergence, "updates", stop_early)
    every = (config.resolved_eval_every, config.resolved_checkpoint_every)
    return run_engine(
        engine, recording, config.num_steps, *every, start,
        on_record=on_record, log=log, save_checkpoint=save_checkpoint,
        stop_requested=stop_requested,
    )  # fmt: skip

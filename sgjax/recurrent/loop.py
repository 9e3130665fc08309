"""The host side of a recurrent run: compiled chunks between records, the curriculum or the
validation score at each record, early stopping, checkpoints, stop requests and divergence."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.text import TextCorpus, as_streams
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.programs import LN2, ChunkStats, CopyProgram, TextProgram, level_sizes
from sgjax.training.checkpoint import CheckpointError, OrbaxStore
from sgjax.training.config import ConfigError
from sgjax.training.loop import _format_eta, chunk_plan

RNN_CHECKPOINT_FORMAT = 1
IGNORED_CONFIG_KEYS = ("output_dir", "checkpoint_every", "text_file", "valid_file", "test_file")
"""Settings that may differ on resume (the texts are checked by their sizes instead)."""


@dataclasses.dataclass(frozen=True)
class RNNRecord:
    """One row of metrics.csv: training means over the period, the task's scores at its end."""

    step: int
    train_bits: float
    """Training loss in bits per output element (copy tasks) or per character (char_lm)."""
    sg_loss: float
    aux_loss: float
    level: tuple[int, int] | None = None
    """Copy tasks: the curriculum's (N, R) at the record."""
    episode_error: float | None = None
    """Copy tasks: bits per element wrong in the last finished batch of episodes."""
    max_episode_solved: int | None = None
    valid_bpc: float | None = None
    test_bpc: float | None = None
    elapsed_s: float = 0.0


class RNNResume(NamedTuple):
    """Where a resumed run starts."""

    state: Any
    records: list[RNNRecord]
    period: ChunkStats
    """Sums since the last record (as host floats)."""
    period_steps: int
    train_time_s: float
    eval_time_s: float


@dataclasses.dataclass
class RNNRunResult:
    state: Any
    records: list[RNNRecord]
    status: str
    message: str
    compile_time_s: float
    train_time_s: float
    eval_time_s: float
    steps_done: int
    curriculum: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """Copy tasks: (update, episode size) at which each level was solved."""

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.train_time_s if self.train_time_s > 0 else float("nan")


class Scores(NamedTuple):
    """The best validation point of a char_lm run (early stopping)."""

    best_valid_bpc: float | None
    best_step: int | None
    test_bpc: float | None
    validations_since_best: int


def char_lm_scores(records: list[RNNRecord]) -> Scores:
    """The best validation record and the test bits per character there."""
    best: RNNRecord | None = None
    since = 0
    for record in records:
        if record.valid_bpc is None:
            continue
        if best is None or record.valid_bpc < best.valid_bpc:
            best, since = record, 0
        else:
            since += 1
    if best is None:
        return Scores(None, None, None, 0)
    return Scores(best.valid_bpc, best.step, best.test_bpc, since)


def program_for(config: RNNConfig, corpus: TextCorpus | None) -> CopyProgram | TextProgram:
    if config.task == "char_lm":
        assert corpus is not None
        return TextProgram(config, corpus.vocab_size)
    return CopyProgram(config)


def text_streams(config: RNNConfig, corpus: TextCorpus) -> dict[str, np.ndarray]:
    """Training streams (``batch_size`` of them) and evaluation streams; raises ConfigError
    when the training text is too short for one segment per stream."""
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


def _host(stats: ChunkStats) -> ChunkStats:
    return ChunkStats(*(float(x) for x in jax.device_get(stats)))


def _add(a: ChunkStats, b: ChunkStats) -> ChunkStats:
    return ChunkStats(*(x + y for x, y in zip(a, b, strict=True)))


ZERO_STATS = ChunkStats(0.0, 0.0, 0.0, 0.0)


def curriculum_curve(program: CopyProgram, state: Any) -> list[tuple[int, int]]:
    """(update, episode size) of every level solved so far."""
    steps = [int(s) for s in np.asarray(jax.device_get(state.solved_steps)) if s >= 0]
    return list(zip(steps, level_sizes(program.task, len(steps)), strict=True))


def train_recurrent(
    config: RNNConfig,
    corpus: TextCorpus | None = None,
    *,
    on_record: Callable[[RNNRecord], None] | None = None,
    log: Callable[[str], None] = print,
    start: RNNResume | None = None,
    save_checkpoint: Callable[[RNNResume], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> RNNRunResult:
    """Run ``config`` (with ``corpus`` for char_lm): compile every chunk shape, then train,
    recording every ``eval_every`` updates. char_lm scores the validation and test texts at each
    record and stops early after ``patience`` records without a better validation score.
    A non-finite training loss ends the run with status "diverged"; a KeyboardInterrupt (also
    while compiling) with "interrupted", as does ``stop_requested()`` after a chunk.
    """
    program = program_for(config, corpus)
    streams = text_streams(config, corpus) if config.task == "char_lm" else {}
    device = {name: jnp.asarray(a) for name, a in streams.items()}
    train_data = device.get("train")
    if start is None:
        start = RNNResume(jax.jit(program.init)(config.seed), [], ZERO_STATS, 0, 0.0, 0.0)
    state = start.state
    records = list(start.records)
    period, period_steps = start.period, start.period_steps
    train_time, eval_time, compile_time = start.train_time_s, start.eval_time_s, 0.0
    steps_done = int(state.step)
    every = config.resolved_eval_every
    plan = chunk_plan(steps_done, config.num_steps, every, config.chunk_steps)

    def result(status: str, message: str) -> RNNRunResult:
        curve = curriculum_curve(program, state) if isinstance(program, CopyProgram) else []
        times = (compile_time, train_time, eval_time)
        return RNNRunResult(state, records, status, message, *times, steps_done, curve)

    try:
        begin = time.perf_counter()
        chunks = {
            n: jax.jit(program.chunk(n), donate_argnums=0).lower(state, train_data).compile()
            for n in sorted(set(plan))
        }
        score = None
        if isinstance(program, TextProgram):
            score = jax.jit(program.bits_per_character).lower(state, device["valid"]).compile()
            score_test = jax.jit(program.bits_per_character).lower(state, device["test"]).compile()
        compile_time = time.perf_counter() - begin
    except KeyboardInterrupt:
        return result("interrupted", f"interrupted while compiling, after step {steps_done}")
    log(f"compiled {len(chunks)} chunk shape(s) in {compile_time:.1f} s")

    status, message = "completed", ""
    session_steps, session_time = 0, 0.0
    try:
        for n in plan:
            begin = time.perf_counter()
            state, stats = chunks[n](state, train_data)
            stats = _host(stats)
            elapsed = time.perf_counter() - begin
            train_time += elapsed
            session_time += elapsed
            steps_done += n
            session_steps += n
            period, period_steps = _add(period, stats), period_steps + n
            speed = session_steps / session_time
            diverged = not math.isfinite(period.loss_sum) or not math.isfinite(period.sg_loss)
            at_record = steps_done % every == 0 or steps_done == config.num_steps
            if at_record or diverged:
                begin = time.perf_counter()
                record = _record(config, program, state, period, period_steps, steps_done)
                if score is not None:
                    record = dataclasses.replace(
                        record,
                        valid_bpc=float(score(state, device["valid"])),
                        test_bpc=float(score_test(state, device["test"])),
                    )
                eval_time += time.perf_counter() - begin
                record = dataclasses.replace(record, elapsed_s=train_time + eval_time)
                records.append(record)
                period, period_steps = ZERO_STATS, 0
                if on_record is not None:
                    on_record(record)
                log(progress_line(record, config.num_steps, speed))
            if diverged:
                status = "diverged"
                message = f"training loss became non-finite by step {steps_done}"
                break
            patience_over = (
                score is not None
                and config.patience
                and char_lm_scores(records).validations_since_best >= config.patience
            )
            stopping = stop_requested()
            last = steps_done == config.num_steps or bool(patience_over)
            due = (
                at_record
                and config.resolved_checkpoint_every
                and (steps_done % config.resolved_checkpoint_every == 0)
            )
            if save_checkpoint is not None and (last or stopping or due):
                save_checkpoint(
                    RNNResume(state, records, period, period_steps, train_time, eval_time)
                )
            if patience_over:
                message = f"stopped early after {config.patience} validations without improvement"
                break
            if stopping and not last:
                status, message = "interrupted", f"stopped after step {steps_done}"
                break
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted after step {steps_done}"
    return result(status, message)


def _record(
    config: RNNConfig,
    program: CopyProgram | TextProgram,
    state: Any,
    period: ChunkStats,
    period_steps: int,
    step: int,
) -> RNNRecord:
    train_bits = period.loss_sum / period.count / LN2 if period.count else math.nan
    common = dict(
        step=step,
        train_bits=train_bits,
        sg_loss=period.sg_loss / max(period_steps, 1),
        aux_loss=period.aux_loss / max(period_steps, 1),
    )
    if isinstance(program, CopyProgram):
        level = tuple(int(x) for x in jax.device_get(state.level))
        error = float(state.last_error)
        return RNNRecord(
            **common,
            level=level,
            episode_error=error if math.isfinite(error) else None,
            max_episode_solved=int(state.solved),
        )
    return RNNRecord(**common)


def progress_line(record: RNNRecord, num_steps: int, steps_per_s: float) -> str:
    eta = (num_steps - record.step) / steps_per_s if steps_per_s > 0 else float("nan")
    line = f"step {record.step:>7d}/{num_steps} | train {record.train_bits:.4f} bits"
    if record.level is not None:
        n, r = record.level
        error = "-" if record.episode_error is None else f"{record.episode_error:.3f}"
        line += (
            f" | level N={n} R={r} error {error} bits/element | largest solved "
            f"{record.max_episode_solved}"
        )
    if record.valid_bpc is not None:
        line += f" | valid {record.valid_bpc:.4f} test {record.test_bpc:.4f} bpc"
    if record.sg_loss:
        line += f" | sg loss {record.sg_loss:.3e}"
    return line + f" | {steps_per_s:,.0f} updates/s | ETA {_format_eta(eta)}"


# ---------------------------------------------------------------- checkpoints


def _comparable(config: RNNConfig, corpus: TextCorpus | None) -> dict[str, Any]:
    values = config.to_dict()
    for key in IGNORED_CONFIG_KEYS:
        values.pop(key, None)
    if corpus is not None:
        values["text_sizes"] = [len(corpus.train), len(corpus.valid), len(corpus.test)]
        values["vocab_size"] = corpus.vocab_size
    return values


class RNNCheckpointer(OrbaxStore):
    """Checkpoints of recurrent runs: the whole run state plus records and period sums."""

    def save(self, point: RNNResume, config: RNNConfig, corpus: TextCorpus | None) -> None:
        meta = {
            "format": RNN_CHECKPOINT_FORMAT,
            "config": _comparable(config, corpus),
            "records": [dataclasses.asdict(r) for r in point.records],
            "period": list(point.period),
            "period_steps": point.period_steps,
            "train_time_s": point.train_time_s,
            "eval_time_s": point.eval_time_s,
        }
        self.save_items(int(point.state.step), point.state, meta)

    def restore(self, config: RNNConfig, corpus: TextCorpus | None) -> RNNResume:
        step, meta = self.read_meta()
        where = self.directory / str(step)
        if not isinstance(meta, dict) or meta.get("format") != RNN_CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{where} is not a recurrent sgjax checkpoint; start again with --overwrite"
            )
        now = _comparable(config, corpus)
        saved = meta.get("config", {})
        differences = [
            f"--{key}={saved.get(key)} (now {now.get(key)})"
            for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)
        ]
        if differences:
            raise CheckpointError(
                f"checkpoint {where} was made with {', '.join(differences)}; resume with the "
                "same flags and texts, or start again with --overwrite"
            )
        program = program_for(config, corpus)  # built outside the trace: it reads the levels
        template = jax.eval_shape(lambda: program.init(config.seed))
        state = self.read_state(step, template)
        records = [
            RNNRecord(**(r | {"level": tuple(r["level"]) if r["level"] else None}))
            for r in meta["records"]
        ]
        return RNNResume(
            state,
            records,
            ChunkStats(*meta["period"]),
            meta["period_steps"],
            meta["train_time_s"],
            meta["eval_time_s"],
        )

"""The compiled training loop: ``lax.scan`` over chunks of steps, evaluation between chunks.
Minibatches are sampled on the device from ``fold_in(key, step)``; the host sees chunk ends."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.core.optim import learning_rate_of, piecewise_schedule, with_learning_rate
from sgjax.core.trainer import UPDATE_KEY, StepMetrics, TrainerState
from sgjax.data.device import DeviceData, sample_batch, scale_images, to_device
from sgjax.data.sources import Dataset
from sgjax.training.config import TrainConfig
from sgjax.training.engine import ChunkMetrics, Engine
from sgjax.training.model import sample_shape, trainer_for


class TrainState(NamedTuple):  # everything that changes during a run
    model: TrainerState  # the initial learning rate is a (traced) hyperparameter in it
    step: jax.Array  # updates done (int32)
    key: jax.Array  # the batch of step t is sampled with fold_in(key, t)

    @property
    def learning_rate(self) -> jax.Array:
        return learning_rate_of(self.model)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One row of metrics.csv: training means over the chunk, test metrics at its end."""

    step: int
    learning_rate: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    sg_loss: tuple[float, ...]
    elapsed_s: float
    input_loss: tuple[float, ...] = ()  # complete unlock only: input_loss_i columns

    def text(self) -> str:  # in the progress line
        line = (
            f"loss {self.train_loss:.4f} acc {self.train_accuracy:.4f} | "
            f"test loss {self.test_loss:.4f} acc {self.test_accuracy:.4f}"
        )
        if self.sg_loss:
            line += " | sg loss " + " ".join(f"{v:.2e}" for v in self.sg_loss)
        if self.input_loss:
            line += " | input loss " + " ".join(f"{v:.2e}" for v in self.input_loss)
        return line

    def cells(self) -> dict[str, str]:
        return {
            "step": str(self.step),
            "learning_rate": f"{self.learning_rate:.6g}",
            **{name: f"{getattr(self, name):.6f}" for name in EVAL_COLUMNS},
            **{f"sg_loss_{i}": f"{v:.6g}" for i, v in enumerate(self.sg_loss, start=1)},
            "elapsed_s": f"{self.elapsed_s:.3f}",
            **{f"input_loss_{i}": f"{v:.6g}" for i, v in enumerate(self.input_loss, start=1)},
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> EvalRecord:
        return cls(**_tuples(saved, "sg_loss", "input_loss"))


EVAL_COLUMNS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _tuples(saved: dict[str, Any], *names: str) -> dict[str, Any]:  # absent (older): empty
    return saved | {name: tuple(saved.get(name, ())) for name in names}


@dataclasses.dataclass
class RunResult:  # what a finished (or stopped) run produced
    state: TrainState
    records: list[EvalRecord]
    status: str
    compile_time_s: float
    train_time_s: float
    eval_time_s: float
    steps_done: int
    message: str = ""

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.train_time_s if self.train_time_s > 0 else float("nan")


@dataclasses.dataclass
class PeriodMetrics:
    """Sums of the training metrics since the last evaluation (``ChunkMetrics`` added up)."""

    steps: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    sg_loss: tuple[float, ...] = ()
    sg_updates: tuple[int, ...] = ()  # per boundary; empty: one update per step
    input_loss: tuple[float, ...] = ()
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> PeriodMetrics:
        return cls(**_tuples(saved, "sg_loss", "sg_updates", "input_loss"))

    def add(self, steps: int, metrics: StepMetrics) -> None:  # a chunk's means, weighted
        self.merge(chunk_sums(steps, metrics))

    def merge(self, chunk: ChunkMetrics) -> None:  # an engine's sums for one ``advance``
        self.sg_loss = _add(self.sg_loss, chunk.sg_loss) if self.sg_loss else chunk.sg_loss
        if chunk.input_loss:
            self.input_loss = _add(self.input_loss, chunk.input_loss)
        if chunk.sg_updates is not None:
            self.sg_updates = _add(self.sg_updates, chunk.sg_updates)
        for name, value in chunk.extra.items():
            self.extra[name] = self.extra.get(name, 0.0) + value
        self.loss += chunk.loss
        self.accuracy += chunk.accuracy
        self.steps += chunk.steps

    def mean(self, name: str) -> float | tuple[float, ...]:
        value = getattr(self, name)
        # The synthetic-input models update at the same ticks as the synthesizers.
        if name in ("sg_loss", "input_loss") and value and self.sg_updates:
            return tuple(
                v / n if n else math.nan for v, n in zip(value, self.sg_updates, strict=True)
            )
        if isinstance(value, tuple):
            return tuple(v / self.steps for v in value)
        return value / self.steps


def _add(sums: tuple, values: tuple) -> tuple:
    """Elementwise sums; an empty ``sums`` counts as zeros."""
    return tuple(a + b for a, b in zip(sums or (0,) * len(values), values, strict=True))


def chunk_sums(steps: int, metrics: StepMetrics) -> ChunkMetrics:
    """A compiled chunk's mean metrics as sums over its steps."""
    sums = lambda v: tuple(steps * float(x) for x in np.asarray(v))  # noqa: E731
    loss, accuracy = steps * float(metrics.loss), steps * float(metrics.accuracy)
    return ChunkMetrics(
        steps, loss, accuracy, sums(metrics.sg_loss), input_loss=sums(metrics.input_loss)
    )


class Resume(NamedTuple):  # where a run starts: a checkpoint's state, records, period, times
    state: TrainState
    records: list[EvalRecord]
    period: PeriodMetrics
    train_time_s: float
    eval_time_s: float
    inflight: Mapping[str, Any] | None = None  # ``Engine.inflight``


SaveCheckpoint = Callable[[Resume], None]
ChunkFn = Callable[[TrainState, DeviceData], tuple[TrainState, StepMetrics]]


def init_train_state(
    config: TrainConfig,
    seed: int | jax.Array | None = None,
    learning_rate: float | jax.Array | None = None,
) -> TrainState:
    """Initial state for ``seed`` and ``learning_rate`` (defaults: the config's); traceable."""
    key = jax.random.PRNGKey(config.seed if seed is None else seed)
    init_key, data_key = jax.random.split(key)
    model = trainer_for(config).init(init_key, jnp.zeros(sample_shape(config), jnp.float32))
    if learning_rate is not None:
        model = with_learning_rate(model, learning_rate)
    return TrainState(model, jnp.zeros((), jnp.int32), data_key)


def make_train_step(config: TrainConfig, update_prob: jax.Array | None = None) -> ChunkFn:
    """One pure train step on step ``state.step``'s batch; ``update_prob`` (traced), else
    ``config.update_prob`` below 1, draws step t's coins from ``fold_in(batch key, UPDATE_KEY)``."""
    trainer = trainer_for(config)
    if update_prob is None and config.update_prob != 1.0:
        update_prob = jnp.float32(config.update_prob)

    def train_step(state: TrainState, data: DeviceData) -> tuple[TrainState, StepMetrics]:
        step_key = jax.random.fold_in(state.key, state.step)
        batch = sample_batch(step_key, data, config.batch_size)
        coins = None if update_prob is None else jax.random.fold_in(step_key, UPDATE_KEY)
        model, metrics = trainer.step(
            state.model, batch.images, batch.labels, key=coins, update_prob=update_prob,
            example_ids=batch.indices, step=state.step,
        )  # fmt: skip
        return state._replace(model=model, step=state.step + 1), metrics

    return train_step


def make_run_chunk(
    config: TrainConfig, num_steps: int, update_prob: jax.Array | None = None
) -> ChunkFn:
    """``num_steps`` train steps in one ``lax.scan``; the metrics averaged over them."""
    train_step = make_train_step(config, update_prob)

    def run_chunk(state: TrainState, data: DeviceData) -> tuple[TrainState, StepMetrics]:
        state, metrics = jax.lax.scan(
            lambda carry, _: train_step(carry, data), state, None, length=num_steps
        )
        return state, jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)

    return run_chunk


def evaluate_state(config: TrainConfig, state: TrainState, data: DeviceData):
    """Test loss and accuracy on the whole test split (BatchNorm running averages)."""
    images = scale_images(data.test_images)
    return trainer_for(config).evaluate(state.model, images, data.test_labels)


class RunHistory(NamedTuple):  # per-evaluation metrics of a compiled run (axis 0: evaluations)
    step: jax.Array
    train_loss: jax.Array
    train_accuracy: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    sg_loss: jax.Array
    input_loss: jax.Array  # complete unlock only (no columns otherwise)


def make_train(config: TrainConfig) -> Callable[..., tuple[TrainState, RunHistory]]:
    """``train(seed, learning_rate, data, update_prob=None)``: the whole run, evaluations too, one
    pure function (vmap it over seeds or rates); the host loop's results to float rounding."""
    lengths = chunk_lengths(config.num_steps, config.eval_every)
    full_chunks = lengths.count(config.eval_every)

    def chunk_and_evaluate(
        state: TrainState, data: DeviceData, run_chunk: ChunkFn, sized: TrainConfig
    ) -> tuple[TrainState, RunHistory]:
        state, metrics = run_chunk(state, data)
        test_loss, test_accuracy = evaluate_state(sized, state, data)
        input_loss = metrics.input_loss
        if not isinstance(input_loss, jax.Array):  # () for every method but the unlock
            input_loss = jnp.zeros((0,), metrics.loss.dtype)
        row = (metrics.loss, metrics.accuracy, test_loss, test_accuracy, metrics.sg_loss)
        return state, RunHistory(state.step, *row, input_loss)

    def train_run(seed, learning_rate, data: DeviceData, update_prob=None):
        sized = config.with_train_examples(data.train_images.shape[0])
        run_full = make_run_chunk(sized, config.eval_every, update_prob)
        state = init_train_state(sized, seed, learning_rate)
        step = lambda s, _: chunk_and_evaluate(s, data, run_full, sized)  # noqa: E731
        state, history = jax.lax.scan(step, state, None, length=full_chunks)
        if lengths[-1] != config.eval_every:
            run_rest = make_run_chunk(sized, lengths[-1], update_prob)
            state, last = chunk_and_evaluate(state, data, run_rest, sized)
            history = jax.tree_util.tree_map(
                lambda h, x: jnp.concatenate([h, x[None]]), history, last
            )
        return state, history

    return train_run


def chunk_lengths(num_steps: int, eval_every: int) -> list[int]:
    """Lengths of the evaluation periods: ``eval_every`` each, the last one possibly shorter."""
    full, rest = divmod(num_steps, eval_every)
    return [eval_every] * full + ([rest] if rest else [])


def chunk_plan(start: int, num_steps: int, eval_every: int, max_chunk: int) -> list[int]:
    """Chunk lengths from step ``start``: each evaluation period cut into ``max_chunk`` pieces from
    its start, so a resumed run continues with the same chunks (at most four shapes)."""
    lengths = []
    step = start
    while step < num_steps:
        period_start = step - step % eval_every
        period_end = min(period_start + eval_every, num_steps)
        piece_end = period_start + ((step - period_start) // max_chunk + 1) * max_chunk
        end = min(piece_end, period_end)
        lengths.append(end - step)
        step = end
    return lengths


def progress_line(step: int, num_steps: int, text: str, steps_per_s: float, unit: str) -> str:
    """One human line per chunk: step, what ``text`` says, speed and ETA."""
    eta = (num_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
    if math.isfinite(eta):
        minutes, secs = divmod(int(round(eta)), 60)
        hours, minutes = divmod(minutes, 60)
        eta = f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
    else:
        eta = "?"
    return f"step {step:>7d}/{num_steps} | {text} | {steps_per_s:,.0f} {unit}/s | ETA {eta}"


class Record(Protocol):  # what the loop needs of a record (``EvalRecord``, ``RNNRecord``)
    step: int
    elapsed_s: float

    def text(self) -> str: ...

    def cells(self) -> dict[str, str]: ...


class Recording(NamedTuple):  # what a kind of run records, and when it ends early
    make: Callable[[int, PeriodMetrics, Any], Record]  # (step, period, evaluate()); no elapsed_s
    chunk_text: Callable[[ChunkMetrics], str]  # a chunk between evaluations
    divergence: Callable[[PeriodMetrics, int], str]  # the first non-finite quantity, or ''
    unit: str = "steps"
    stop_early: Callable[[list[Any]], str] = lambda records: ""  # why to stop now, or ''


def run_engine(
    engine: Engine,
    recording: Recording,
    num_steps: int,
    eval_every: int,
    checkpoint_every: int,
    start: Resume,
    *,
    on_record: Callable[[Any], None] | None = None,
    log: Callable[[str], None] = print,
    save_checkpoint: SaveCheckpoint | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> RunResult:
    """The host loop of every run: compile every chunk shape, then train, a progress line per chunk
    and a record per evaluation; ``save_checkpoint`` every ``checkpoint_every`` steps (0: never),
    at the end and on ``stop_requested()`` ("interrupted"). A non-finite loss ends it "diverged"
    (a last record, no checkpoint), ``recording.stop_early`` "completed", Ctrl-C "interrupted"."""
    period = dataclasses.replace(start.period, extra=dict(start.period.extra))
    records = list(start.records)
    steps_done = int(start.state.step)
    train_time, eval_time = start.train_time_s, start.eval_time_s
    compile_time = 0.0

    def result(status: str, message: str) -> RunResult:
        times = (compile_time, train_time, eval_time)
        return RunResult(engine.state(), records, status, *times, steps_done, message)

    plan = chunk_plan(steps_done, num_steps, eval_every, engine.max_chunk)
    compile_start = time.perf_counter()
    try:
        engine.compile(set(plan))
    except KeyboardInterrupt:
        return result("interrupted", f"interrupted while compiling, at step {steps_done}")
    compile_time = time.perf_counter() - compile_start
    log(f"compiled {len(set(plan))} chunk shape(s) and the evaluation in {compile_time:.1f} s")

    session_steps, session_time = 0, 0.0
    status, message = "completed", ""
    try:
        for n in plan:
            begin = time.perf_counter()
            chunk = engine.advance(n)
            elapsed = time.perf_counter() - begin
            train_time, session_time = train_time + elapsed, session_time + elapsed
            steps_done, session_steps = steps_done + n, session_steps + n
            period.merge(chunk)
            speed = session_steps / session_time

            at_eval = steps_done % eval_every == 0 or steps_done == num_steps
            message = recording.divergence(period, steps_done)
            if not (at_eval or message):
                text = recording.chunk_text(chunk)
                log(progress_line(steps_done, num_steps, text, speed, recording.unit))
            else:
                begin = time.perf_counter()
                record = recording.make(steps_done, period, engine.evaluate())
                eval_time += time.perf_counter() - begin
                record = dataclasses.replace(record, elapsed_s=train_time + eval_time)
                period = PeriodMetrics()
                records.append(record)
                if on_record is not None:
                    on_record(record)
                log(progress_line(steps_done, num_steps, record.text(), speed, recording.unit))
            if message:
                status = "diverged"
                break
            early = recording.stop_early(records)
            stopping = stop_requested()
            last = steps_done == num_steps or bool(early)
            due = at_eval and checkpoint_every and steps_done % checkpoint_every == 0
            if save_checkpoint is not None and (last or stopping or due):
                times = (train_time, eval_time)
                save_checkpoint(Resume(engine.state(), records, period, *times, engine.inflight()))
            if early:
                message = early
                break
            if stopping and not last:
                status, message = "interrupted", f"stopped after step {steps_done}"
                break
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted after step {steps_done}"
    return result(status, message)


class ChunkedEngine:  # one device's compiled chunks: ``chunk(n)(state, data) -> (state, metrics)``
    def __init__(self, chunk: Callable[[int], Callable], data: Any, state: Any, max_chunk: int):
        self.chunk, self.data, self._state, self.max_chunk = chunk, data, state, max_chunk
        self._chunks: dict[int, jax.stages.Compiled] = {}

    def compile(self, chunk_lengths: Collection[int]) -> None:
        self._chunks = {
            n: jax.jit(self.chunk(n), donate_argnums=0).lower(self._state, self.data).compile()
            for n in sorted(set(chunk_lengths))
        }

    def run(self, steps: int) -> Any:  # the chunk of ``steps``; its metrics, on the host
        self._state, metrics = self._chunks[steps](self._state, self.data)
        return jax.device_get(metrics)

    def state(self) -> Any:
        return self._state

    def inflight(self) -> dict[str, Any]:  # nothing in flight between chunks
        return {}


class ScanEngine(ChunkedEngine):  # ``lax.scan`` chunks of ``config.chunk_steps`` at most
    def __init__(self, config: TrainConfig, dataset: Dataset, state: TrainState) -> None:
        chunk = lambda n: make_run_chunk(config, n)  # noqa: E731
        super().__init__(chunk, to_device(dataset), state, config.chunk_steps)
        self.config = config

    def compile(self, chunk_lengths: Collection[int]) -> None:
        super().compile(chunk_lengths)
        evaluate = jax.jit(evaluate_state, static_argnums=0)
        self._evaluate = evaluate.lower(self.config, self._state, self.data).compile()

    def advance(self, steps: int) -> ChunkMetrics:
        return chunk_sums(steps, self.run(steps))

    def evaluate(self) -> tuple[float, float]:
        loss, accuracy = jax.device_get(self._evaluate(self._state, self.data))
        return float(loss), float(accuracy)


def train_and_evaluate(
    config: TrainConfig,
    dataset: Dataset,
    *,
    on_record: Callable[[EvalRecord], None] | None = None,
    log: Callable[[str], None] = print,
    start: Resume | None = None,
    save_checkpoint: SaveCheckpoint | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    engine: Engine | None = None,
) -> RunResult:
    """Run ``config`` on ``dataset`` with ``run_engine`` (an ``engine`` built from ``start``)."""
    config = config.with_train_examples(dataset.train_size)
    if start is None:
        initial = jax.jit(init_train_state, static_argnums=0)(config)
        start = Resume(initial, [], PeriodMetrics(), 0.0, 0.0)
    if engine is None:
        engine = ScanEngine(config, dataset, start.state)
    schedule = piecewise_schedule(config.learning_rate, config.resolved_lr_boundaries)

    def make(step: int, period: PeriodMetrics, evaluation: tuple[float, float]) -> EvalRecord:
        loss, accuracy, sg, inputs = map(period.mean, ("loss", "accuracy", "sg_loss", "input_loss"))
        rate = float(schedule(step - 1))
        return EvalRecord(step, rate, loss, accuracy, *map(float, evaluation), sg, 0.0, inputs)

    every = (config.eval_every, config.resolved_checkpoint_every)
    return run_engine(
        engine, Recording(make, _chunk_text, _divergence), config.num_steps, *every, start,
        on_record=on_record, log=log, save_checkpoint=save_checkpoint,
        stop_requested=stop_requested,
    )  # fmt: skip


def _chunk_text(chunk: ChunkMetrics) -> str:
    return (
        f"loss {chunk.loss / chunk.steps:.4f} acc {chunk.accuracy / chunk.steps:.4f} (last chunk)"
    )


def _divergence(period: PeriodMetrics, step: int) -> str:
    if not math.isfinite(period.loss):
        return f"training loss became {period.mean('loss')} by step {step}"
    updated = period.sg_updates or (1,) * len(period.sg_loss)
    for layer, (value, n) in enumerate(zip(period.mean("sg_loss"), updated, strict=True), start=1):
        if n and not math.isfinite(value):
            return f"synthetic-gradient loss of layer {layer} became {value} by step {step}"
    for layer, value in enumerate(period.mean("input_loss"), start=1):
        if not math.isfinite(value):
            return f"synthetic-input loss of layer {layer} became {value} by step {step}"
    return ""

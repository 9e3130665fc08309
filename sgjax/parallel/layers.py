"""Layer-parallel training: every layer (a *stage*) on its own device.

Three schedules (``KINDS``), all started from the single-device loop's initial state and fed the
same minibatches (minibatch b is ``sample_batch(fold_in(key, b), ...)``):

* ``sg_pipeline``: decoupled (sg/cdni) training, pipelined: at every tick every stage works on a
  different minibatch (``sgjax.parallel.sg_pipeline``, where the staleness is stated exactly);
* ``bp_model_parallel``: backprop with the layers on the devices, one minibatch at a time;
* ``bp_gpipe``: backprop with each minibatch split into microbatches that flow through the
  stages as a pipeline, gradients accumulated, one update per minibatch
  (``sgjax.parallel.bp_pipeline``).

Stages are the hidden blocks then the output layer, grouped evenly over ``num_devices`` devices.
Records are written every ``eval_every`` minibatches *that reached the output layer*; in the sg
pipeline the earlier blocks are then up to L minibatches ahead, and the last record follows the
drain, when every layer and module has trained on all N minibatches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.device import DeviceData, to_device
from sgjax.data.sources import Dataset
from sgjax.parallel.bp_pipeline import BackpropPipeline
from sgjax.parallel.sg_pipeline import SgPipeline
from sgjax.parallel.stages import Engine, ideal_speedup, stage_devices
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import (
    EvalRecord,
    RunResult,
    TrainState,
    chunk_lengths,
    evaluate_state,
    init_train_state,
    progress_line,
    schedule_for,
)
from sgjax.training.model import trainer_for

KINDS = ("sg_pipeline", "bp_model_parallel", "bp_gpipe")


def parallel_kind(mode: str, microbatches: int = 1) -> str:
    """The layer-parallel schedule of a ``--mode``: sg/cdni pipeline; bp model-parallel, or GPipe
    when ``microbatches`` > 1."""
    if mode != "bp":
        return "sg_pipeline"
    return "bp_gpipe" if microbatches > 1 else "bp_model_parallel"


@dataclasses.dataclass
class ParallelRunResult(RunResult):
    """A ``RunResult`` with where the stages ran and, if timed, each stage's own time."""

    kind: str = ""
    stage_devices: tuple[int, ...] = ()
    """Id of the device each stage ran on (hidden blocks, then the output layer), read from
    where its final state lives."""
    microbatches: int = 1
    stage_ms: tuple[float, ...] = ()
    """Each stage alone: ms per tick (sg) or per minibatch (bp); empty if not timed."""

    @property
    def num_devices(self) -> int:
        return len(set(self.stage_devices))

    @property
    def ideal_speedup(self) -> float:
        """Sum of the stage times over the busiest device's time (NaN if not timed)."""
        if not self.stage_ms:
            return float("nan")
        micro = None if self.kind == "sg_pipeline" else self.microbatches
        return ideal_speedup(self.stage_ms, self.stage_devices, micro)


def num_pipeline_stages(config: TrainConfig, kind: str) -> int:
    """Pipeline stages of ``kind``: the Trainer's groups (sg) or its stages (bp)."""
    trainer = trainer_for(config)
    return len(trainer.groups) if kind == "sg_pipeline" else len(trainer.stages)


def validate_parallel(config: TrainConfig, kind: str, microbatches: int) -> None:
    """Raise ConfigError, naming the flag, for a schedule that cannot run this configuration."""
    if kind not in KINDS:
        raise ConfigError(f"unknown layer-parallel schedule {kind!r}; choose one of {KINDS}")
    if microbatches < 1:
        raise ConfigError(f"--microbatches={microbatches} must be a positive integer")
    if kind == "sg_pipeline" and not config.decoupled:
        raise ConfigError("the synthetic-gradient pipeline needs --mode=sg or --mode=cdni")
    if kind != "sg_pipeline" and config.decoupled:
        raise ConfigError(f"{kind} is backprop: it needs --mode=bp")
    if kind != "bp_gpipe" and microbatches != 1:
        raise ConfigError(
            f"--microbatches={microbatches} applies to GPipe backprop only (--mode=bp)"
        )
    if config.batch_size % microbatches:
        raise ConfigError(
            f"--batch_size={config.batch_size} must be a multiple of --microbatches={microbatches}"
        )


def make_engine(
    config: TrainConfig,
    data: DeviceData,
    initial: TrainState,
    kind: str,
    devices: tuple[jax.Device, ...],
    microbatches: int = 1,
) -> Engine:
    """The schedule ``kind`` over ``devices`` (one per stage), starting from ``initial``."""
    trainer = trainer_for(config)
    if kind == "sg_pipeline":
        return SgPipeline(trainer, config, data, devices, initial.model, initial.key)
    return BackpropPipeline(
        trainer, config, data, devices, initial.model, initial.key, microbatches
    )


def train_layer_parallel(
    config: TrainConfig,
    dataset: Dataset,
    *,
    kind: str,
    num_devices: int,
    microbatches: int = 1,
    log: Callable[[str], None] = print,
    on_record: Callable[[EvalRecord], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    stage_timing_repeats: int = 0,
    devices: list[jax.Device] | None = None,
) -> ParallelRunResult:
    """Train ``config`` with the layer-parallel schedule ``kind`` on ``num_devices`` devices.

    Like ``sgjax.training.loop.train_and_evaluate``: every stage function (and the evaluation)
    is compiled first and its time reported apart; records every ``eval_every`` minibatches;
    status "completed", "diverged" (a non-finite loss) or "interrupted" (``stop_requested()``,
    Ctrl-C). There are no checkpoints (minibatches are in flight between evaluations).
    ``stage_timing_repeats`` > 0 times each stage alone afterwards (``stage_ms``).
    """
    config.validate()
    validate_parallel(config, kind, microbatches)
    placement = stage_devices(num_pipeline_stages(config, kind), num_devices, devices)
    home = placement[0]
    data = to_device(dataset, home)
    initial = jax.jit(init_train_state, static_argnums=0)(config)
    engine = make_engine(config, data, initial, kind, placement, microbatches)
    log(
        f"{kind}: stages on devices {[d.id for d in placement]} "
        f"({len(set(placement))} of {len(jax.local_devices())})"
    )

    start = time.perf_counter()
    engine.compile()
    evaluate = jax.jit(evaluate_state, static_argnums=0).lower(config, initial, data).compile()
    compile_time = time.perf_counter() - start
    log(f"compiled the stage functions and the evaluation in {compile_time:.1f} s")

    schedule = schedule_for(config)
    records: list[EvalRecord] = []
    train_time = eval_time = 0.0
    done = 0
    status, message = "completed", ""
    try:
        for n in chunk_lengths(config.num_steps, config.eval_every):
            begin = time.perf_counter()
            window = engine.advance(done + n)
            engine.block_until_ready()
            window = jax.device_get(window)
            train_time += time.perf_counter() - begin
            done += n

            begin = time.perf_counter()
            current = initial._replace(model=engine.model_state(home))
            test_loss, test_acc = jax.device_get(evaluate(current, data))
            eval_time += time.perf_counter() - begin

            record = EvalRecord(
                step=done,
                learning_rate=float(schedule(done - 1)),
                train_loss=_mean(window.loss),
                train_accuracy=_mean(window.accuracy),
                test_loss=float(test_loss),
                test_accuracy=float(test_acc),
                sg_loss=tuple(_mean(values) for values in window.sg_loss),
                elapsed_s=train_time + eval_time,
            )
            records.append(record)
            if on_record is not None:
                on_record(record)
            log(progress_line(record, config.num_steps, done / train_time))
            message = _divergence(record, [bool(v) for v in window.sg_loss])
            if message:
                status = "diverged"
                break
            if stop_requested() and done < config.num_steps:
                status, message = "interrupted", f"stopped after step {done}"
                break
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted after step {done}"

    state = TrainState(engine.model_state(home), jnp.asarray(done, jnp.int32), initial.key)
    stage_ms = engine.stage_ms(stage_timing_repeats) if stage_timing_repeats > 0 else ()
    return ParallelRunResult(
        state=state,
        records=records,
        status=status,
        compile_time_s=compile_time,
        train_time_s=train_time,
        eval_time_s=eval_time,
        steps_done=done,
        message=message,
        kind=kind,
        stage_devices=engine.state_devices(),
        microbatches=microbatches,
        stage_ms=stage_ms,
    )


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else math.nan


def _divergence(record: EvalRecord, sg_updated: list[bool]) -> str:
    """A one-line description of the first non-finite training quantity, or ''.

    A module without an update in the period (possible with ``eval_every`` < 2) has no loss.
    """
    if not math.isfinite(record.train_loss):
        return f"training loss became {record.train_loss} by step {record.step}"
    for layer, (value, updated) in enumerate(zip(record.sg_loss, sg_updated, strict=True), 1):
        if updated and not math.isfinite(value):
            return f"synthetic-gradient loss of layer {layer} became {value} by step {record.step}"
    return ""

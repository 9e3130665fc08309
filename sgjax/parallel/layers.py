"""Layer-parallel training of the paper's networks (``--parallel=layers``): a ``TrainConfig`` run
through ``sgjax.parallel.spmd.PipelineEngine``.

Three schedules (``KINDS``), all started from the single-device loop's initial state and fed the
same minibatches (minibatch b is ``sample_batch(fold_in(key, b), ...)``):

* ``sg_pipeline``: decoupled training (sg/cdni, dgl, zero_grad, the complete unlock; any
  --update_prob), pipelined: at every tick every stage works on a different minibatch
  (the complete unlock: on the same one);
* ``bp_model_parallel``: backprop with the layers on the devices, one minibatch at a time;
* ``bp_gpipe``: backprop with each minibatch split into microbatches that flow through the
  stages as a pipeline, gradients accumulated, one update per minibatch.

The schedules themselves are in ``sgjax.parallel.schedules``; any ``Trainer`` can be pipelined
with ``PipelineEngine`` directly. The run is the single-device loop's (``train_and_evaluate``)
driving the engine: the same records, stop requests and checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from sgjax.data.device import DeviceData, sample_batch, scale_images
from sgjax.data.sources import Dataset
from sgjax.parallel.schedules import BatchSource, Schedule
from sgjax.parallel.spmd import PipelineEngine
from sgjax.parallel.stages import ideal_speedup
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import (
    EvalRecord,
    PeriodMetrics,
    Resume,
    RunResult,
    SaveCheckpoint,
    init_train_state,
    train_and_evaluate,
)
from sgjax.training.model import trainer_for

KINDS = ("sg_pipeline", "bp_model_parallel", "bp_gpipe")
ENGINES = ("dispatch", "spmd")
"""Accepted --engine values: both run the one SPMD engine (``PipelineEngine``); ``dispatch``,
the host-dispatched engine that it replaced, is kept as a name so commands keep working."""


def parallel_kind(mode: str, microbatches: int = 1) -> str:
    """The layer-parallel schedule of a ``--mode``: the decoupled pipeline (sg, cdni, dgl,
    zero_grad); bp model-parallel, or GPipe when ``microbatches`` > 1."""
    if mode != "bp":
        return "sg_pipeline"
    return "bp_gpipe" if microbatches > 1 else "bp_model_parallel"


@dataclasses.dataclass
class ParallelRunResult(RunResult):
    """A ``RunResult`` with where the stages ran and, if timed, each stage's own time."""

    kind: str = ""
    stage_devices: tuple[int, ...] = ()
    """Id of the device each pipeline stage ran on."""
    microbatches: int = 1
    stage_ms: tuple[float, ...] = ()
    """Each stage alone: ms per tick (decoupled) or per minibatch (bp); empty if not timed."""

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
    """Pipeline stages of ``kind``: the Trainer's groups (decoupled) or its stages (bp)."""
    trainer = trainer_for(config)
    return len(trainer.groups) if kind == "sg_pipeline" else len(trainer.stages)


def validate_parallel(config: TrainConfig, kind: str, microbatches: int) -> None:
    """Raise ConfigError, naming the flag, for a schedule that cannot run this configuration."""
    if kind not in KINDS:
        raise ConfigError(f"unknown layer-parallel schedule {kind!r}; choose one of {KINDS}")
    if microbatches < 1:
        raise ConfigError(f"--microbatches={microbatches} must be a positive integer")
    # What --parallel=layers refuses (bp_lambda, stale_grad(_example), bp with --update_prob:
    # TrainConfig.validate), also for a config built with --parallel=none (the benchmark's).
    dataclasses.replace(config, parallel="layers")
    if kind == "sg_pipeline" and not config.decoupled:
        raise ConfigError("the decoupled pipeline needs --mode=sg, cdni, dgl or zero_grad (not bp)")
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


def image_batches(dataset: Dataset, batch_size: int) -> BatchSource:
    """The single-device loop's minibatches of ``dataset`` (``sample_batch``) and its test
    split, as a ``BatchSource``."""
    data = DeviceData(
        train_images=np.asarray(dataset.train_images, np.uint8),
        train_labels=np.asarray(dataset.train_labels, np.int32),
        test_images=np.asarray(dataset.test_images, np.uint8),
        test_labels=np.asarray(dataset.test_labels, np.int32),
    )

    def sample(d: DeviceData, key: jax.Array, index: jax.Array) -> tuple:
        batch = sample_batch(jax.random.fold_in(key, index), d, batch_size)
        return batch.images, batch.labels

    def test(d: DeviceData) -> tuple:
        return scale_images(d.test_images), d.test_labels

    return BatchSource(data, sample, test)


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
    start: Resume | None = None,
    save_checkpoint: SaveCheckpoint | None = None,
    stage_timing_repeats: int = 0,
    devices: Sequence[jax.Device] | None = None,
    engine: str = "spmd",
) -> ParallelRunResult:
    """Train ``config`` with the layer-parallel schedule ``kind`` on ``num_devices`` devices of
    ``devices`` (default: every process's; 0: one per stage, as many as there are).

    The loop is ``sgjax.training.loop.train_and_evaluate`` driving a ``PipelineEngine``: the
    same records (every ``eval_every`` minibatches that reached the last stage), statuses, stop
    requests and checkpoints (``start`` resumes one; the minibatches in flight are saved with it,
    so a resumed run computes exactly what an uninterrupted one does).
    ``stage_timing_repeats`` > 0 times each stage alone afterwards (``stage_ms``). ``engine``:
    ``spmd`` or ``dispatch``, the same engine.
    """
    config.validate()
    validate_parallel(config, kind, microbatches)
    if engine not in ENGINES:
        raise ConfigError(f"unknown --engine={engine!r}; choose one of {', '.join(ENGINES)}")
    if start is None:
        initial = jax.jit(init_train_state, static_argnums=0)(config)
        start = Resume(initial, [], PeriodMetrics(), 0.0, 0.0)
    schedule = Schedule(
        kind,
        config.num_steps,
        config.batch_size,
        config.update_prob,
        microbatches,
        config.chunk_steps,
    )
    pipeline = PipelineEngine(
        trainer_for(config),
        image_batches(dataset, config.batch_size),
        start.state,
        schedule,
        num_devices=num_devices,
        devices=devices,
        inflight=start.inflight,
    )
    log(
        f"{kind}: stages on devices {list(pipeline.stage_devices())} "
        f"({pipeline.mesh.devices.size} of {jax.device_count()}, {jax.process_count()} "
        "process(es))"
    )
    result = train_and_evaluate(
        config,
        dataset,
        on_record=on_record,
        log=log,
        start=start,
        save_checkpoint=save_checkpoint,
        stop_requested=stop_requested,
        engine=pipeline,
    )
    return ParallelRunResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(RunResult)},
        kind=kind,
        stage_devices=pipeline.stage_devices(),
        microbatches=microbatches,
        stage_ms=pipeline.stage_ms(stage_timing_repeats) if stage_timing_repeats > 0 else (),
    )

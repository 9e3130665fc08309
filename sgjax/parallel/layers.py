"""Layer-parallel training of the paper's networks (``--parallel=layers``): a ``TrainConfig`` run
by ``train_and_evaluate`` through ``sgjax.parallel.spmd.PipelineEngine``, from the single-device
loop's initial state and minibatches. Schedules (``KINDS``, in ``sgjax.parallel.schedules``):

* ``sg_pipeline``: decoupled training (any decoupled mode and --update_prob), pipelined: at every
  tick every stage works on a different minibatch (the complete unlock: on the same one);
* ``bp_model_parallel``: backprop with the layers on the devices, one minibatch at a time;
* ``bp_gpipe``: backprop with each minibatch split into microbatches flowing through the stages,
  gradients accumulated, one update per minibatch.
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
    """The single-device loop's minibatches of ``dataset`` and its test split (``BatchSource``)."""
    d, types = dataset, (np.uint8, np.int32) * 2
    arrays = (d.train_images, d.train_labels, d.test_images, d.test_labels)
    data = DeviceData(*(np.asarray(a, t) for a, t in zip(arrays, types, strict=True)))

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
    """Train ``config`` with schedule ``kind`` on ``num_devices`` devices of ``devices`` (default:
    every process's; 0: one per stage) by ``train_and_evaluate`` driving a ``PipelineEngine``:
    the same records, statuses, stop requests and checkpoints (saved with the minibatches in
    flight, so a resumed run computes what an uninterrupted one does). ``stage_timing_repeats``
    > 0 times each stage alone afterwards (``stage_ms``)."""
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
        config, dataset, on_record=on_record, log=log, start=start,
        save_checkpoint=save_checkpoint, stop_requested=stop_requested, engine=pipeline,
    )  # fmt: skip
    return ParallelRunResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(RunResult)}, kind=kind,
        stage_devices=pipeline.stage_devices(), microbatches=microbatches,
        stage_ms=pipeline.stage_ms(stage_timing_repeats) if stage_timing_repeats > 0 else (),
    )  # fmt: skip

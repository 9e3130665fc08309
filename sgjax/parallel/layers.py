"""Layer-parallel training: every layer (a *stage*) on its own device.

Three schedules (``KINDS``), all started from the single-device loop's initial state and fed the
same minibatches (minibatch b is ``sample_batch(fold_in(key, b), ...)``):

* ``sg_pipeline``: decoupled (sg/cdni, dgl, zero_grad; any --update_prob) training, pipelined:
  at every tick every stage works on a different minibatch (``sgjax.parallel.sg_pipeline``,
  where the staleness is stated exactly; dgl and zero_grad have none);
* ``bp_model_parallel``: backprop with the layers on the devices, one minibatch at a time;
* ``bp_gpipe``: backprop with each minibatch split into microbatches that flow through the
  stages as a pipeline, gradients accumulated, one update per minibatch
  (``sgjax.parallel.bp_pipeline``).

Pipeline stages (the ``Trainer``'s groups for sg, its stages for bp; for the MLP: the hidden
blocks, then the output layer) are grouped evenly over ``num_devices`` devices. The run is the
single-device loop's (``train_and_evaluate``) driving a ``PipelineEngine``. Records are written
every ``eval_every`` minibatches *that reached the last stage*; in the sg pipeline the earlier
groups are then up to L minibatches ahead, and the last record follows the drain, when every
group and module has trained on all N minibatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.device import DeviceData, to_device
from sgjax.data.sources import Dataset
from sgjax.parallel.bp_pipeline import BackpropPipeline
from sgjax.parallel.sg_pipeline import SgPipeline
from sgjax.parallel.stages import Pipeline, ideal_speedup, stage_devices
from sgjax.parallel.unlocked import UnlockedPipeline
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.engine import ChunkMetrics
from sgjax.training.loop import (
    EvalRecord,
    PeriodMetrics,
    Resume,
    RunResult,
    SaveCheckpoint,
    TrainState,
    evaluate_state,
    init_train_state,
    train_and_evaluate,
)
from sgjax.training.model import trainer_for

KINDS = ("sg_pipeline", "bp_model_parallel", "bp_gpipe")
ENGINES = ("dispatch", "spmd")
"""dispatch: one jitted call per stage per tick from the host (this module's pipelines);
spmd: one SPMD program per chunk of ticks (``sgjax.parallel.spmd``)."""


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
    # What --parallel=layers refuses (bp_lambda, stale_grad, bp with
    # --update_prob: TrainConfig.validate), also for a config built with --parallel=none (the
    # benchmark's).
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


def make_pipeline(
    config: TrainConfig,
    data: DeviceData,
    start: TrainState,
    kind: str,
    devices: tuple[jax.Device, ...],
    microbatches: int = 1,
    inflight: Mapping[str, Any] | None = None,
) -> Pipeline:
    """The schedule ``kind`` over ``devices`` (one per pipeline stage), continuing ``start``."""
    trainer, step = trainer_for(config), int(start.step)
    if kind == "sg_pipeline" and trainer.unlocked:
        return UnlockedPipeline(
            trainer, config, data, devices, start.model, start.key, step=step, inflight=inflight
        )
    if kind == "sg_pipeline":
        return SgPipeline(
            trainer, config, data, devices, start.model, start.key, step=step, inflight=inflight
        )
    return BackpropPipeline(
        trainer, config, data, devices, start.model, start.key, microbatches, step=step
    )


class PipelineEngine:
    """A layer-parallel schedule as an ``Engine`` of the training loop: one ``advance`` per
    evaluation period; the state is gathered on the first stage's device."""

    def __init__(
        self, config: TrainConfig, pipeline: Pipeline, data: DeviceData, start: TrainState
    ):
        self.config = config
        self.pipeline = pipeline
        self.max_chunk = config.eval_every
        self.data = data
        self.home = pipeline.devices[0]
        self._key = start.key
        self._done = int(start.step)
        self._evaluate: jax.stages.Compiled | None = None

    def compile(self, chunk_lengths: Collection[int]) -> None:
        del chunk_lengths  # the stage functions do not depend on them
        self.pipeline.compile()
        self._evaluate = (
            jax.jit(evaluate_state, static_argnums=0)
            .lower(self.config, self.state(), self.data)
            .compile()
        )

    def advance(self, steps: int) -> ChunkMetrics:
        window = self.pipeline.advance(self._done + steps)
        self.pipeline.block_until_ready()
        window = jax.device_get(window)
        self._done += steps
        # One loss per minibatch, or per microbatch (GPipe): their mean stands for each step.
        return ChunkMetrics(
            steps,
            steps * float(np.mean(window.loss)),
            steps * float(np.mean(window.accuracy)),
            tuple(float(np.sum(values)) for values in window.sg_loss),
            tuple(len(values) for values in window.sg_loss),
            tuple(float(np.sum(values)) for values in window.input_loss),
        )

    def state(self) -> TrainState:
        step = jnp.asarray(self._done, jnp.int32)
        return TrainState(self.pipeline.model_state(self.home), step, self._key)

    def evaluate(self) -> tuple[float, float]:
        loss, accuracy = jax.device_get(self._evaluate(self.state(), self.data))
        return float(loss), float(accuracy)

    def inflight(self) -> dict[str, jax.Array]:
        return self.pipeline.inflight()


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
    devices: list[jax.Device] | None = None,
    engine: str = "dispatch",
) -> ParallelRunResult:
    """Train ``config`` with the layer-parallel schedule ``kind`` on ``num_devices`` devices.

    The loop is ``sgjax.training.loop.train_and_evaluate`` driving a ``PipelineEngine``: the
    same records (every ``eval_every`` minibatches that reached the last stage), statuses, stop
    requests and checkpoints (``start`` resumes one; the sg pipeline's minibatches in flight are
    saved with it, so a resumed run computes exactly what an uninterrupted one does).
    ``stage_timing_repeats`` > 0 times each stage alone afterwards (``stage_ms``).
    ``engine="spmd"`` runs the same schedule as one SPMD program per chunk
    (``sgjax.parallel.spmd``), one stage per device of ``devices`` (default: every process's).
    """
    config.validate()
    validate_parallel(config, kind, microbatches)
    if engine == "spmd":
        return _train_spmd(
            config,
            dataset,
            kind,
            num_devices,
            microbatches,
            log,
            on_record,
            stop_requested,
            start,
            save_checkpoint,
            devices,
            stage_timing_repeats,
        )
    if engine != "dispatch":
        raise ConfigError(f"unknown --engine={engine!r}; choose one of {', '.join(ENGINES)}")
    placement = stage_devices(num_pipeline_stages(config, kind), num_devices, devices)
    data = to_device(dataset, placement[0])
    if start is None:
        initial = jax.jit(init_train_state, static_argnums=0)(config)
        start = Resume(initial, [], PeriodMetrics(), 0.0, 0.0)
    pipeline = make_pipeline(
        config, data, start.state, kind, placement, microbatches, start.inflight
    )
    log(
        f"{kind}: stages on devices {[d.id for d in placement]} "
        f"({len(set(placement))} of {len(jax.local_devices())})"
    )
    result = train_and_evaluate(
        config,
        dataset,
        on_record=on_record,
        log=log,
        start=start,
        save_checkpoint=save_checkpoint,
        stop_requested=stop_requested,
        engine=PipelineEngine(config, pipeline, data, start.state),
    )
    stage_ms = pipeline.stage_ms(stage_timing_repeats) if stage_timing_repeats > 0 else ()
    return ParallelRunResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(RunResult)},
        kind=kind,
        stage_devices=pipeline.state_devices(),
        microbatches=microbatches,
        stage_ms=stage_ms,
    )


def _train_spmd(
    config: TrainConfig,
    dataset: Dataset,
    kind: str,
    num_devices: int,
    microbatches: int,
    log: Callable[[str], None],
    on_record: Callable[[EvalRecord], None] | None,
    stop_requested: Callable[[], bool],
    start: Resume | None,
    save_checkpoint: SaveCheckpoint | None,
    devices: list[jax.Device] | None,
    stage_timing_repeats: int,
) -> ParallelRunResult:
    """``train_layer_parallel`` with the SPMD engine."""
    from sgjax.parallel.spmd import SpmdEngine, stage_mesh

    mesh = stage_mesh(num_pipeline_stages(config, kind), num_devices, devices)
    if start is None:
        initial = jax.jit(init_train_state, static_argnums=0)(config)
        start = Resume(initial, [], PeriodMetrics(), 0.0, 0.0)
    data = to_device(dataset, jax.local_devices()[0])
    engine = SpmdEngine(config, kind, data, start.state, mesh, microbatches, start.inflight)
    log(
        f"{kind} (spmd): stages on devices {list(engine.stage_devices())} "
        f"({mesh.devices.size} of {jax.device_count()}, {jax.process_count()} process(es))"
    )
    result = train_and_evaluate(
        config,
        dataset,
        on_record=on_record,
        log=log,
        start=start,
        save_checkpoint=save_checkpoint,
        stop_requested=stop_requested,
        engine=engine,
    )
    return ParallelRunResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(RunResult)},
        kind=kind,
        stage_devices=engine.stage_devices(),
        microbatches=microbatches,
        stage_ms=engine.stage_ms(stage_timing_repeats) if stage_timing_repeats > 0 else (),
    )

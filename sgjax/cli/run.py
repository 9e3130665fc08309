"""One run end to end as the command line does it (output folder, checkpoints, signals, exit
code); the configuration, data and output folder are all checked before the first write."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import jax
import numpy as np

from sgjax.cli.errors import EXIT_DIVERGED, fail
from sgjax.data.sources import DataError, Dataset, load_dataset
from sgjax.training.architecture import estimated_bytes, network_text, synthesizer_text
from sgjax.training.checkpoint import Checkpointer, CheckpointError
from sgjax.training.config import ConfigError, RunConfig, TrainConfig
from sgjax.training.loop import EvalRecord, Resume, RunResult, init_train_state, train_and_evaluate
from sgjax.training.records import (
    MetricsWriter,
    OutputError,
    build_results,
    metrics_columns,
    prepare_output_dir,
    summary_lines,
    write_json_atomic,
)

STAGE_TIMING_REPEATS = 20  # calls per stage, timing each layer's step alone
RUN_FILES = ("results.json", "metrics.csv", "checkpoints")
EXIT_CODE_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """SIGINT/SIGTERM: the first stops the loop after the chunk, a second SIGINT at once."""

    signal: int | None = None

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODE_FOR_SIGNAL}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        _say(f"{name} received: stopping after the current chunk (Ctrl-C again stops at once)")

    def __call__(self) -> bool:
        return self.signal is not None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def claim_output_dir(
    folder: Path, resume: bool, overwrite: bool, run_files: Sequence[str] = RUN_FILES
) -> Path:
    """Refuse a folder holding an earlier run unless resuming or overwriting; make it writable."""
    earlier = [name for name in run_files if (folder / name).exists()]
    if earlier and not (resume or overwrite):
        raise OutputError(
            f"--output_dir={str(folder)!r} already holds a run ({', '.join(earlier)}); pass "
            "--resume to continue it, --overwrite to replace it, or choose another folder"
        )
    prepare_output_dir(folder)
    if overwrite and not resume:
        for name in earlier:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return folder


class Job(NamedTuple):  # what ``run_job`` needs that differs between scripts
    config: RunConfig
    output_dir: Path
    header: list[str]  # lines printed before the run (data, network)
    columns: Sequence[str]  # metrics.csv's
    template: Callable[[], Any]  # the state's shapes (``jax.eval_shape``), to resume
    train: Callable[..., RunResult]  # (on_record=, start=, save_checkpoint=, stop_requested=)
    results: Callable[[RunResult], dict[str, Any]]  # results.json
    summary: Callable[[dict[str, Any]], list[str]]
    run_files: Sequence[str] = RUN_FILES
    identity: dict[str, Any] | None = None  # what a resume must match besides the config
    record_type: Any = EvalRecord
    finish: Callable[[dict[str, Any], Path], None] = lambda results, folder: None  # e.g. plots
    writer: bool = True  # whether this process writes the files (process 0 with --distributed)


def run_job(prepare: Callable[[], Job], *, resume: bool = False, overwrite: bool = False) -> int:
    """A run end to end: ``prepare()`` (checks; nothing is written before), the output folder,
    checkpoints, metrics.csv, signals, results.json and summary; the exit code."""
    try:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
        job = prepare()
        config, output_dir = job.config, job.output_dir
        if job.writer:
            claim_output_dir(output_dir, resume, overwrite, job.run_files)
        checkpointer = Checkpointer(output_dir / "checkpoints") if job.writer or resume else None
        start = None
        if resume and checkpointer.latest_step() is None:
            print(f"no checkpoint in {checkpointer.directory}: starting from step 0", flush=True)
        elif resume:
            start = checkpointer.restore(
                config, job.template(), extra=job.identity, record_type=job.record_type
            )
    except (ConfigError, DataError, OutputError, CheckpointError) as error:
        fail(str(error))
    where = f"resuming from step {int(start.state.step)} in" if start else "writing to"
    print(*job.header, f"{where} {output_dir}", sep="\n", flush=True)

    def save(point: Resume) -> None:
        if job.writer:  # every process gathered the state, as the collectives require
            checkpointer.save(point, config, job.identity)

    if not job.writer and checkpointer is not None:
        checkpointer = checkpointer.close()
    metrics = MetricsWriter(
        output_dir / "metrics.csv" if job.writer else Path(os.devnull), job.columns
    )
    try:
        for record in start.records if start else []:
            metrics.write(record)
        with StopRequest() as stop:
            result = job.train(
                on_record=metrics.write,
                start=start,
                save_checkpoint=save if config.resolved_checkpoint_every else None,
                stop_requested=stop,
            )
    finally:
        metrics.close()
        if checkpointer is not None:
            checkpointer.close()
    if not job.writer:
        print(f"process {jax.process_index()}: {result.status}", flush=True)
    else:
        results = job.results(result)
        write_json_atomic(output_dir / "results.json", results)
        job.finish(results, output_dir)
        print(*job.summary(results), sep="\n", flush=True)
    return report_status(result.status, result.message, output_dir, stop.signal)


def run_training(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    def prepare() -> Job:
        config.validate()
        if config.parallel == "layers":
            _check_parallel(config)
        elif config.engine != "dispatch":
            raise ConfigError(f"--engine={config.engine} applies to --parallel=layers only")
        dataset = load_dataset(config.dataset, config.data_dir)
        sized = config.with_train_examples(dataset.train_size)
        check_fits(sized, dataset)
        header = [f"data: {dataset.reason}", f"network: {network_text(sized)}"]
        header.append(f"synthesizers: {synthesizer_text(sized)}")
        boundaries = sized.hidden_layers * sized.decoupled
        return Job(
            sized,
            Path(sized.output_dir or Path("runs") / sized.mode),
            header,
            metrics_columns(boundaries, boundaries * sized.synthetic_inputs),
            lambda: jax.eval_shape(lambda: init_train_state(sized)),
            partial(_train, sized, dataset),
            partial(build_results, sized, dataset),
            summary_lines,
            writer=jax.process_index() == 0,  # only process 0 writes (--distributed)
        )

    return run_job(prepare, resume=resume, overwrite=overwrite)


def _train(config: TrainConfig, dataset: Dataset, *, stop_requested, **loop: Any) -> RunResult:
    if config.parallel != "layers":
        return train_and_evaluate(config, dataset, stop_requested=stop_requested, **loop)
    from sgjax.parallel.layers import parallel_kind, train_layer_parallel

    return train_layer_parallel(
        config, dataset, kind=parallel_kind(config.mode, config.microbatches),
        num_devices=_parallel_devices(config), microbatches=config.microbatches,
        stop_requested=agreed(stop_requested), stage_timing_repeats=STAGE_TIMING_REPEATS,
        engine=config.engine, **loop,
    )  # fmt: skip


def agreed(stop: StopRequest) -> Callable[[], bool]:
    """``stop`` as process 0 sees it, on every process (all must stop after the same chunk)."""
    if jax.process_count() == 1:
        return stop

    def decision() -> bool:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.int32(stop())))

    return decision


def check_fits(config: TrainConfig, dataset: Dataset) -> None:
    """Refuse a network too big for the device or a batch bigger than the training set."""
    reduce = "--hidden_units, --hidden_layers, --sg_hidden_units or --batch_size"
    if config.mode == "stale_grad_example":
        reduce += " (--mode=stale_grad_example keeps a row per training image)"
    check_memory("network", estimated_bytes(config.with_train_examples(dataset.train_size)), reduce)
    if config.batch_size > dataset.train_size:
        raise ConfigError(
            f"--batch_size={config.batch_size} is larger than the {dataset.train_size} "
            f"training images of {dataset.name} ({dataset.source}); use a smaller batch"
        )


def check_memory(what: str, needed: int, reduce: str) -> None:
    """Refuse a run needing more than the device's allocator limit (CPU: the host's RAM)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = int(stats.get("bytes_limit", ram))
    if needed > available:
        raise ConfigError(
            f"this {what} needs about {needed / 2**30:.1f} GiB but the device has "
            f"{available / 2**30:.1f} GiB; reduce {reduce}"
        )


def _check_parallel(config: TrainConfig) -> None:  # before any file is written
    from sgjax.parallel.layers import num_pipeline_stages, parallel_kind, validate_parallel
    from sgjax.parallel.stages import stage_devices

    kind = parallel_kind(config.mode, config.microbatches)
    validate_parallel(config, kind, config.microbatches)
    if config.engine == "spmd":
        from sgjax.parallel.spmd import stage_mesh

        stage_mesh(num_pipeline_stages(config, kind), config.num_devices, None)
    else:
        stage_devices(num_pipeline_stages(config, kind), _parallel_devices(config))


def _parallel_devices(config: TrainConfig) -> int:
    """--num_devices, or (0) as many as there are, at most one per stage (SPMD: one per stage)."""
    if config.num_devices or config.engine == "spmd":
        return config.num_devices
    return min(jax.device_count(), config.hidden_layers + 1)


def report_status(
    status: str, message: str, output_dir: Path, signum: int | None, resumable: bool = True
) -> int:
    """Say how a run ended (one line on stderr unless completed); the exit code.
    ``resumable=False`` (the layer-parallel benchmark) says to start again instead."""
    if status == "diverged":
        _say(
            f"error: run diverged: {message}; results so far and the last good checkpoint are "
            f"in {output_dir}; lower --learning_rate and start again"
        )
        return EXIT_DIVERGED
    if status == "interrupted":
        kept = [a for a in sys.argv if a not in ("--overwrite", "--resume")]
        how = (
            f"resume with: {' '.join(['python', *kept, '--resume'])}"
            if resumable
            else "this comparison cannot be resumed; run it again with --overwrite"
        )
        _say(f"{message}; results so far in {output_dir}; {how}")
        return EXIT_CODE_FOR_SIGNAL.get(signum, 130)
    return 0

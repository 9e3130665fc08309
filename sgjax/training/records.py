"""Run records: results.json (written atomically), metrics.csv (one row per evaluation)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import jax

from sgjax.data.sources import Dataset
from sgjax.training.architecture import network_text, synthesizer_text
from sgjax.training.config import RunConfig, TrainConfig
from sgjax.training.loop import EVAL_COLUMNS, Record, RunResult


class OutputError(OSError):
    """The output folder cannot be used; the message is one line saying what to do."""


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any work starts."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write to --output_dir={str(path)!r} ({reason}); pass a folder you can write to"
        ) from None
    return folder


def _finite_or_none(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON (non-finite floats as null) to a fsynced temporary file renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600; results are for everyone to read
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_finite_or_none(payload), handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metrics_columns(num_sg_layers: int, num_input_models: int = 0) -> list[str]:
    """metrics.csv's header: sg_loss_i per decoupled boundary, input_loss_i after elapsed_s."""
    sg, inputs = (range(1, n + 1) for n in (num_sg_layers, num_input_models))
    sg_columns, input_columns = [f"sg_loss_{i}" for i in sg], [f"input_loss_{i}" for i in inputs]
    return ["step", "learning_rate", *EVAL_COLUMNS, *sg_columns, "elapsed_s", *input_columns]


class MetricsWriter:
    """metrics.csv: the ``columns`` of each record's ``cells()``, a row per record, flushed."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self._handle: IO[str] = open(path, "w", newline="")
        self._writer = csv.writer(self._handle)
        self._writer.writerow(self.columns)
        self._handle.flush()

    def write(self, record: Record) -> None:
        cells = record.cells()
        self._writer.writerow([cells[name] for name in self.columns])
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    kind = {"platform": device.platform, "device_kind": device.device_kind}
    return kind | {"device_count": jax.device_count()}


def versions() -> dict[str, str]:  # of the libraries that decide the numbers
    import flax
    import jaxlib
    import optax

    return {m.__name__: m.__version__ for m in (jax, jaxlib, flax, optax)}


def run_results(config: RunConfig, result: RunResult, **fields: Any) -> dict[str, Any]:
    """results.json: what every run reports, with the run's own ``fields`` before the times."""
    return {
        "status": result.status,
        "message": result.message,
        "num_steps": config.num_steps,
        "steps_done": result.steps_done,
        "seed": config.seed,
        **fields,
        "train_time_s": result.train_time_s,
        "eval_time_s": result.eval_time_s,
        "compile_time_s": result.compile_time_s,
        "steps_per_s": result.steps_per_s,
        "device": device_info(),
        "versions": versions(),
        "config": config.recorded(),
        "history": [dataclasses.asdict(r) for r in result.records],
    }


def build_results(config: TrainConfig, dataset: Dataset, result: RunResult) -> dict[str, Any]:
    last = result.records[-1] if result.records else None
    parallel = None
    if hasattr(result, "stage_devices"):
        names = ("kind", "stage_devices", "microbatches", "stage_ms", "ideal_speedup")
        parallel = {name: getattr(result, name) for name in names}
        parallel |= {"stage_devices": list(result.stage_devices), "stage_ms": list(result.stage_ms)}
    scores = ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "sg_loss", "input_loss")
    last_scores = {name: getattr(last, name) if last else None for name in scores}
    last_scores |= {name: list(last_scores[name]) for name in scores[4:] if last}
    return run_results(
        config, result, mode=config.mode, network=network_text(config),
        synthesizers=synthesizer_text(config), **last_scores,
        dataset=dataset.describe(), parallel=parallel,
    )  # fmt: skip


def speed_text(results: dict[str, Any], unit: str) -> str:
    return (
        f"training {results['train_time_s']:.1f} s ({results['steps_per_s']:.1f} {unit}/s), "
        f"compile {results['compile_time_s']:.1f} s"
    )


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short human summary printed at the end of a run."""
    acc, dataset, parallel = results["test_accuracy"], results["dataset"], results.get("parallel")
    lines = [
        f"{results['mode']}: {results['status']} after {results['steps_done']} of "
        f"{results['num_steps']} steps on {dataset['name']} "
        f"({dataset['source']}, {dataset['train_size']} train images)",
        f"test accuracy {acc:.4f}, test loss {results['test_loss']:.4f}"
        if acc is not None
        else "no evaluation was reached",
        f"{speed_text(results, 'steps')}, evaluation {results['eval_time_s']:.1f} s",
    ]
    if parallel:
        where = f"{parallel['kind']} on devices {parallel['stage_devices']}"
        stage_ms = " / ".join(f"{ms:.2f}" for ms in parallel["stage_ms"])
        lines.append(
            f"{where}: each stage's step alone {stage_ms} ms; ideal speed-up from those times "
            f"{parallel['ideal_speedup']:.2f}x"
            if parallel["stage_ms"]  # else not timed
            else where
        )
    return lines

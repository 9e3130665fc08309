"""Finished programs on disk (``programs/NNN.npz`` and ``.json``, written atomically) for
``--resume``; other settings are refused and a program stopped midway runs again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from sgjax.bench.programs import BenchmarkSettings, ProgramResult, SeparateRuns
from sgjax.bench.sweep import ProgramSpec
from sgjax.training.config import ConfigError
from sgjax.training.loop import RunHistory
from sgjax.training.records import write_json_atomic

OUTPUT_FILES = ("table.md", "benchmark.json", "grid.md", "programs")
_SCALARS = tuple(
    "compile_s run_s step_flops eval_flops num_devices peak_memory_bytes "
    "program_memory_bytes".split()
)


class ProgramStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder) / "programs"

    def start(self, settings: BenchmarkSettings, resume: bool) -> dict[int, ProgramResult]:
        """Prepare the store; on resume, return the finished programs (refusing other settings)."""
        wanted = json.loads(json.dumps(settings.to_dict(), default=str))
        for name in ("output_dir", "data_dir"):  # where files are is no setting
            wanted["base_config"].pop(name, None)
        wanted.pop("tta_fractions")  # what the report reads off the runs, not how they ran
        path = self.folder / "settings.json"
        if resume and path.exists():
            saved = _read_json(path, "resume is impossible; use --overwrite")
            if saved != wanted:
                changed = sorted(k for k in {*saved, *wanted} if saved.get(k) != wanted.get(k))
                raise ConfigError(
                    f"the benchmark in {self.folder.parent} was run with other settings "
                    f"({', '.join(changed)} differ); resume with the same flags or use --overwrite"
                )
            specs = enumerate(settings.programs())
            return {
                i: self._load(i, s) for i, s in specs if (self.folder / f"{i:03d}.json").exists()
            }
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        write_json_atomic(path, wanted)
        return {}

    def save(self, index: int, result: ProgramResult) -> None:
        """Store one finished program (arrays first, then the JSON that marks it complete)."""
        arrays = {f"history.{k}": np.asarray(v) for k, v in result.history._asdict().items()}
        if result.separate is not None:
            separate = result.separate.history._asdict()
            arrays |= {f"separate.{k}": np.asarray(v) for k, v in separate.items()}
        tmp = self.folder / f".{index:03d}.npz.tmp"
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / f"{index:03d}.npz")
        meta: dict[str, Any] = {name: getattr(result, name) for name in _SCALARS}
        if (separate := result.separate) is not None:
            meta["separate"] = {"compile_s": separate.compile_s, "run_s": separate.run_s}
        write_json_atomic(self.folder / f"{index:03d}.json", meta)

    def _load(self, index: int, spec: ProgramSpec) -> ProgramResult:
        meta = _read_json(self.folder / f"{index:03d}.json", _RERUN_HINT)
        path = self.folder / f"{index:03d}.npz"
        try:
            with np.load(path) as arrays:
                history = _history(arrays, "history")
                separate = None
                if "separate" in meta:
                    separate = SeparateRuns(
                        meta["separate"]["compile_s"],
                        tuple(meta["separate"]["run_s"]),
                        _history(arrays, "separate"),
                    )
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise ConfigError(f"cannot read {path} ({error}); {_RERUN_HINT}") from None
        missing = [name for name in _SCALARS if name not in meta]
        if missing:
            raise ConfigError(
                f"{self.folder / f'{index:03d}.json'} lacks {', '.join(missing)}; {_RERUN_HINT}"
            )
        scalars = {name: meta[name] for name in _SCALARS}
        return ProgramResult(spec=spec, history=history, separate=separate, **scalars)


_RERUN_HINT = "delete it to run that program again, or use --overwrite"


def _history(arrays: Any, prefix: str) -> RunHistory:
    """A stored RunHistory (without input losses in older stores: zero columns)."""
    fields = {}
    for name in RunHistory._fields:
        key = f"{prefix}.{name}"
        if name == "input_loss" and key not in arrays:
            fields[name] = np.zeros((*arrays[f"{prefix}.sg_loss"].shape[:-1], 0), np.float32)
        else:
            fields[name] = arrays[key]
    return RunHistory(**fields)


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path} ({error}); {hint}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} does not hold a JSON object; {hint}")
    return value


def divergence(result: ProgramResult) -> str:
    """One line naming the first run with a non-finite training or synthetic loss, or ''."""
    spec = result.spec
    for run in range(spec.num_runs):
        where = (
            f"{spec.config.mode} run {run} (seed {spec.run_seeds()[run]}, learning rate "
            f"{spec.run_learning_rates()[run]:g})"
        )
        losses = result.history.train_loss[run]
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = int(result.history.step[run][bad[0]])
            return f"{where}: training loss not finite by step {step}"
        for name, values in (
            ("synthetic-gradient", result.history.sg_loss[run]),
            ("synthetic-input", result.history.input_loss[run]),
        ):
            if values.size and not np.all(np.isfinite(values)):
                evaluation, layer = np.argwhere(~np.isfinite(values))[0]
                step = int(result.history.step[run][evaluation])
                return f"{where}: {name} loss of layer {layer + 1} not finite by step {step}"
    return ""

"""A stopped benchmark keeps its finished programs and resumes without running them again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from forked_cases import forked_runs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "benchmark.py")
ENV = os.environ | {"JAX_PLATFORMS": "cpu"}
TINY = [
    "--modes=bp,sg,cdni",
    "--num_steps=20",
    "--eval_every=10",
    "--batch_size=32",
    "--hidden_layers=2",
    "--hidden_units=16",
    "--sg_hidden_layers=1",
    "--sg_hidden_units=16",
    "--loop_steps=0",
]


def _args(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, *TINY, f"--output_dir={output_dir}", *extra]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)


def _benchmark(output_dir: Path) -> dict:
    return json.loads((output_dir / "benchmark.json").read_text())


def test_sigint_after_a_program_then_resume(tmp_path):
    output_dir = tmp_path / "bench"
    log = tmp_path / "stdout.txt"
    with log.open("w") as stdout:
        process = subprocess.Popen(
            _args(output_dir),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            # sg must still be compiling when the signal comes: no executables from the
            # session's compilation cache (tests/conftest.py), as in a fresh session.
            env=ENV | {"JAX_ENABLE_COMPILATION_CACHE": "false"},
            cwd=REPO,
        )
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            if "sg: compiling" in log.read_text():  # bp is done; sg has started
                break
            time.sleep(0.01)
        assert process.poll() is None, "the benchmark ended before it could be signalled"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr.strip().splitlines()[-1]
    stopped = _benchmark(output_dir)
    assert stopped["status"] == "interrupted"
    finished = [p["config"]["mode"] for p in stopped["programs"]]
    assert finished[0] == "bp" and len(finished) < 3
    assert (output_dir / "table.md").read_text().count("Status: interrupted") == 1

    # Three runs forked from one Python start (tests/forked_cases.py), one after another.
    runs = forked_runs(
        SCRIPT,
        {
            "refused": _args(output_dir)[2:],
            "other": _args(output_dir, "--resume", "--num_steps=30")[2:],
            "resumed": _args(output_dir, "--resume")[2:],
        },
        tmp_path,
        ENV,
    )
    refused, other, resumed = runs["refused"], runs["other"], runs["resumed"]
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert other.returncode == 2 and "other settings" in other.stderr, other.stderr

    assert resumed.returncode == 0, resumed.stderr
    assert "bp: done in an earlier session, not run again" in resumed.stdout
    complete = _benchmark(output_dir)
    assert complete["status"] == "completed"
    assert [p["config"]["mode"] for p in complete["programs"]] == ["bp", "sg", "cdni"]
    np.testing.assert_array_equal(
        complete["programs"][0]["history"]["test_loss"],
        stopped["programs"][0]["history"]["test_loss"],
    )


def test_a_diverging_benchmark_stops_with_exit_3(tmp_path):
    # sg alone (the mode that diverges at this rate; bp's BatchNorm keeps its loss finite): one
    # program instead of three.
    done = _run(_args(tmp_path, "--learning_rate=1e8", "--modes=sg"))
    assert done.returncode == 3, done.stderr
    assert _benchmark(tmp_path)["status"] == "diverged"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite by step" in errors[0]


def test_corrupt_program_files_on_resume_are_one_line_and_exit_2(tmp_path):
    output_dir = tmp_path / "bench"
    quick = [*TINY[1:], "--modes=bp", f"--output_dir={output_dir}"]
    assert _run([sys.executable, SCRIPT, *quick]).returncode == 0
    # Each resume on its own copy of the folder, forked from one Python start
    # (tests/forked_cases.py): three with a corrupted file, one with an older program file.
    broken = [("000.json", '{"compile_s": 1.'), ("000.json", "[]"), ("settings.json", "")]
    cases = {}
    for i, (name, payload) in enumerate(broken):
        copy = tmp_path / f"broken{i}"
        shutil.copytree(output_dir, copy)
        (copy / "programs" / name).write_text(payload)
        cases[f"broken{i}"] = [*quick[:-1], f"--output_dir={copy}", "--resume"]
    # A program stored before the input losses were kept (no history.input_loss) still loads,
    # with no input-loss columns.
    npz = output_dir / "programs" / "000.npz"
    with np.load(npz) as arrays:
        kept = {k: arrays[k] for k in arrays.files if not k.endswith(".input_loss")}
    assert len(kept) < len(np.load(npz).files)
    np.savez(npz, **kept)
    cases["older"] = [*quick, "--resume"]
    runs = forked_runs(SCRIPT, cases, tmp_path, ENV)
    for i, (name, _) in enumerate(broken):
        done, path = runs[f"broken{i}"], tmp_path / f"broken{i}" / "programs" / name
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], lines
    done = runs["older"]
    assert done.returncode == 0, done.stderr
    history = _benchmark(output_dir)["programs"][0]["history"]
    assert np.asarray(history["input_loss"]).size == 0
    assert len(history["test_loss"][0]) == 2

"""The real command line: a tiny run's files, and each bad input's one-line error (exit 2)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from forked_cases import forked_runs_once

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "mnist_mlp.py")
TINY = ["--num_steps=20", "--eval_every=10", "--hidden_units=32", "--sg_hidden_units=32"]


def test_a_tiny_run_writes_results_and_metrics(bad_runs):
    root, runs = bad_runs
    done, tmp_path = runs["tiny"], root / "tiny"
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["mode"] == "sg" and results["num_steps"] == 20 and results["seed"] == 0
    for key in ("test_accuracy", "test_loss", "train_time_s", "compile_time_s", "steps_per_s"):
        assert isinstance(results[key], float) and results[key] >= 0, key
    assert results["dataset"] | {"reason": "", "location": ""} == {
        "name": "mnist",
        "source": "embedded",
        "train_size": 5000,
        "test_size": 10000,
        "reason": "",
        "location": "",
    }
    assert results["device"]["platform"] == "cpu"
    assert set(results["versions"]) >= {"jax", "flax", "optax"}
    assert results["config"]["hidden_units"] == 32
    assert results["config"]["sg_hidden_layers"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert list(rows[0]) == [
        "step",
        "learning_rate",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "sg_loss_1",
        "sg_loss_2",
        "sg_loss_3",
        "elapsed_s",
    ]
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert "embedded MNIST" in done.stdout  # the data line says which data and why


def _idx_folder(
    folder: Path, *, labels_override: np.ndarray | None = None, compress: bool = True
) -> Path:
    """Four small, valid IDX files (gzipped unless told) with 20 train and 10 test images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    pack = gzip.compress if compress else bytes
    for prefix, count in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        if labels_override is not None and prefix == "train":
            labels = labels_override
        header = np.array([2051, count, 28, 28], ">i4").tobytes()
        (folder / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(
            pack(header + images.tobytes())
        )
        header = np.array([2049, len(labels)], ">i4").tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(
            pack(header + labels.tobytes())
        )
    return folder


def _bad_data(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / f"idx-{kind}"
    if kind == "empty":
        folder.mkdir()
    elif kind == "nonexistent":
        pass
    elif kind == "a file":
        folder.write_bytes(b"not a folder")
    elif kind == "labels":
        labels = np.arange(20, dtype=np.uint8) % 10
        labels[7] = 10  # one past the last class
        _idx_folder(folder, labels_override=labels)
    elif kind == "count":
        _idx_folder(folder, labels_override=np.arange(19, dtype=np.uint8) % 10)
    elif kind == "missing":
        _idx_folder(folder)
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    elif kind == "gzip":
        _idx_folder(folder)
        images = folder / "train-images-idx3-ubyte.gz"
        images.write_bytes(images.read_bytes()[:40])  # gzip magic, then a cut-off stream
    elif kind == "raw truncated":
        _idx_folder(folder, compress=False)
        images = folder / "t10k-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:-100])
    elif kind == "raw extra bytes":
        _idx_folder(folder, compress=False)
        labels = folder / "t10k-labels-idx1-ubyte"
        labels.write_bytes(labels.read_bytes() + b"\0\0")
    else:
        _idx_folder(folder)
        images = folder / "train-images-idx3-ubyte.gz"
        raw = gzip.decompress(images.read_bytes())
        if kind == "truncated":
            raw = raw[: len(raw) // 2]
        elif kind == "magic":
            raw = np.array([1234], ">i4").tobytes() + raw[4:]
        images.write_bytes(gzip.compress(raw))
    return folder


BAD_INPUTS = {
    "unknown mode": (["--mode=dni"], "--mode"),
    "unknown dataset": (["--dataset=cifar"], "--dataset"),
    "zero steps": (["--num_steps=0"], "--num_steps"),
    "negative batch": (["--batch_size=-4"], "--batch_size"),
    "zero width": (["--hidden_units=0"], "--hidden_units"),
    "zero depth": (["--hidden_layers=0"], "--hidden_layers"),
    "zero module width": (["--sg_hidden_units=0"], "--sg_hidden_units"),
    "negative module depth": (["--sg_hidden_layers=-1"], "--sg_hidden_layers"),
    "text for a number": (["--num_steps=many"], "--num_steps"),
    "bad boundaries": (["--lr_boundaries=15,5"], "--lr_boundaries"),
    "zero learning rate": (["--learning_rate=0"], "--learning_rate"),
    "batch above training set": (["--batch_size=6000"], "--batch_size"),
    "stray argument": (["sg"], "unexpected"),
    "unknown flag": (["--steps=5"], "steps"),
    "empty mode": (["--mode="], "--mode"),
    "negative steps": (["--num_steps=-5"], "--num_steps"),
    "steps above the int32 step counter": ([f"--num_steps={2**31}"], "--num_steps"),
    "zero batch": (["--batch_size=0"], "--batch_size"),
    "fraction for an integer": (["--batch_size=2.5"], "--batch_size"),
    "negative width": (["--hidden_units=-32"], "--hidden_units"),
    "zero eval interval": (["--eval_every=0"], "--eval_every"),
    "seed out of range": ([f"--seed={2**40}"], "--seed"),
    "text boundaries": (["--lr_boundaries=a,b"], "--lr_boundaries"),
    "fractional boundary": (["--lr_boundaries=1.5"], "--lr_boundaries"),
    "repeated boundary": (["--lr_boundaries=5,5"], "--lr_boundaries"),
    "boundary at num_steps": (["--lr_boundaries=5,20"], "--lr_boundaries"),
    "zero boundary": (["--lr_boundaries=0,5"], "--lr_boundaries"),
    "negative learning rate": (["--learning_rate=-0.1"], "--learning_rate"),
    "nan learning rate": (["--learning_rate=nan"], "--learning_rate"),
    "infinite learning rate": (["--learning_rate=inf"], "--learning_rate"),
    "text learning rate": (["--learning_rate=fast"], "--learning_rate"),
    "two stray arguments": (["sg", "more"], "unexpected"),
    "unknown parallel": (["--parallel=rows"], "--parallel"),
    "more devices than there are": (["--parallel=layers", "--num_devices=3"], "--num_devices"),
    "microbatches without GPipe": (["--parallel=layers", "--microbatches=2"], "--microbatches"),
    "microbatches not dividing": (
        ["--parallel=layers", "--mode=bp", "--microbatches=3"],
        "--microbatches",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every run that must stop with a one-line error (bad inputs, bad data folders, a late
    error, output folders that cannot be made), each case with its own folder under the
    returned one (``input/<case>/out``, ``data/<kind>/out``, ...), and two runs that complete
    (``tiny``, ``idx``), forked from one Python start (tests/forked_cases.py), once per session
    also under pytest-xdist (in the session's folder: ``shared_fixture.computed_once``)."""

    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    return forked_runs_once(tmp_path_factory, "cli_forked_runs", SCRIPT, _forked_cases, env)


def _forked_cases(root: Path) -> dict[str, list[str]]:
    """The fixture's cases (name -> arguments), their folders made under ``root``."""
    cases = {}
    for case, (extra, _) in BAD_INPUTS.items():
        (root / "input" / case).mkdir(parents=True)
        cases[f"input {case}"] = [*TINY, f"--output_dir={root / 'input' / case / 'out'}", *extra]
    for kind in BAD_DATA:
        (root / "data" / kind).mkdir(parents=True)
        folder = _bad_data(root / "data" / kind, kind)
        out = root / "data" / kind / "out"
        cases[f"data {kind}"] = [*TINY, f"--data_dir={folder}", f"--output_dir={out}"]
        cases[f"data {kind}"].append("--batch_size=8")
    (root / "late" / "out").mkdir(parents=True)  # an existing folder a late error must not touch
    cases["late"] = [*TINY, f"--output_dir={root / 'late' / 'out'}", "--batch_size=6000"]
    (root / "a_file").write_text("")  # root ignores permission bits: a file blocks the folder
    cases["unwritable"] = [*TINY, f"--output_dir={root / 'a_file' / 'out'}"]
    cases["proc"] = [*TINY, f"--output_dir={PROC_OUTPUT}"]
    # Two runs that complete, forked from the same start (tests that read their folders).
    cases["tiny"] = ["--mode=sg", *TINY, f"--output_dir={root / 'tiny'}"]
    folder = _idx_folder(root / "idx" / "idx")
    cases["idx"] = [*TINY, f"--data_dir={folder}", f"--output_dir={root / 'idx' / 'out'}"]
    cases["idx"].append("--batch_size=8")
    return cases


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, bad_runs):
    root, runs = bad_runs
    _assert_one_line_error(runs[f"input {case}"], BAD_INPUTS[case][1])
    assert not (root / "input" / case / "out").exists()


# What each broken --data_dir must name: the file (or folder) at fault and what is wrong with it.
BAD_DATA = {
    "empty": ("idx-empty", "missing", "train-images-idx3-ubyte"),
    "nonexistent": ("idx-nonexistent", "does not exist"),
    "a file": ("idx-a file", "not a folder"),
    "missing": ("t10k-labels-idx1-ubyte", "missing"),
    "truncated": ("train-images-idx3-ubyte.gz", "truncated"),
    "magic": ("train-images-idx3-ubyte.gz", "magic 1234"),
    "labels": ("train-labels-idx1-ubyte.gz", "label 10"),
    "count": ("train-labels-idx1-ubyte.gz", "19 labels"),
    "gzip": ("train-images-idx3-ubyte.gz", "gzip"),
    "raw truncated": ("t10k-images-idx3-ubyte", "truncated"),
    "raw extra bytes": ("t10k-labels-idx1-ubyte", "beyond"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_dir_names_the_file(kind: str, bad_runs):
    root, runs = bad_runs
    _assert_one_line_error(runs[f"data {kind}"], *BAD_DATA[kind])
    assert not (root / "data" / kind / "out").exists()


def test_a_late_error_leaves_an_existing_output_folder_as_it_was(bad_runs):
    # The batch check needs the data loaded: the last check before the folder is claimed.
    root, runs = bad_runs
    _assert_one_line_error(runs["late"], "--batch_size", "5000")
    assert list((root / "late" / "out").iterdir()) == []


def test_valid_idx_folder_is_used(bad_runs):
    root, runs = bad_runs
    done, tmp_path = runs["idx"], root / "idx"
    assert done.returncode == 0, done.stderr
    dataset = json.loads((tmp_path / "out" / "results.json").read_text())["dataset"]
    assert (dataset["source"], dataset["train_size"], dataset["test_size"]) == ("idx", 20, 10)


def test_library_logging_stays_off_stderr(tmp_path):
    # Without JAX_PLATFORMS, JAX logs its backend probing (e.g. "I1125 ... Unable to initialize
    # backend 'tpu'") through absl; the batch check initialises the backend before it fails.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    output_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, SCRIPT, *TINY, f"--output_dir={output_dir}", "--batch_size=6000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    _assert_one_line_error(done, "--batch_size")
    assert not output_dir.exists()


def test_layer_parallel_run_on_four_devices(tmp_path):
    from local_processes import xla_flags  # the fast compile of the multi-device tests

    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            *TINY,
            "--mode=cdni",
            "--parallel=layers",
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(4)},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["parallel"] == "layers"
    parallel = results["parallel"]
    assert parallel["kind"] == "sg_pipeline"
    assert parallel["stage_devices"] == [0, 1, 2, 3]
    assert len(parallel["stage_ms"]) == 4 and min(parallel["stage_ms"]) > 0
    assert parallel["ideal_speedup"] > 1
    assert "ideal speed-up" in done.stdout


def test_unwritable_output_folder(bad_runs):
    root, runs = bad_runs
    blocker = root / "a_file"
    _assert_one_line_error(runs["unwritable"], str(blocker / "out"))
    assert blocker.is_file() and blocker.read_text() == ""


PROC_OUTPUT = Path("/proc") / "sgjax-test-no-such-folder" / "out"  # /proc takes no new folder


def test_output_folder_under_proc(bad_runs):
    _assert_one_line_error(bad_runs[1]["proc"], str(PROC_OUTPUT), "--output_dir")
    assert not PROC_OUTPUT.exists()


def _assert_one_line_error(done: subprocess.CompletedProcess, *keywords: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    for keyword in keywords:
        assert keyword in lines[0], (keyword, lines[0])

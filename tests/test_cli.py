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

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "mnist_mlp.py")
TINY = ["--num_steps=20", "--eval_every=10", "--hidden_units=32", "--sg_hidden_units=32"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )


def test_a_tiny_run_writes_results_and_metrics(tmp_path):
    done = _run("--mode=sg", *TINY, f"--output_dir={tmp_path}")
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


def _idx_folder(folder: Path, *, labels_override: np.ndarray | None = None) -> Path:
    """Four small, valid IDX files (gzipped) with 20 train and 10 test images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        if labels_override is not None and prefix == "train":
            labels = labels_override
        header = np.array([2051, count, 28, 28], ">i4").tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.tobytes())
        )
        header = np.array([2049, count], ">i4").tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(header + labels.tobytes())
        )
    return folder


def _bad_data(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / f"idx-{kind}"
    if kind == "empty":
        folder.mkdir()
    elif kind == "labels":
        _idx_folder(folder, labels_override=np.full(20, 12, np.uint8))
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
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path):
    extra, keyword = BAD_INPUTS[case]
    output_dir = tmp_path / "out"
    done = _run(*TINY, f"--output_dir={output_dir}", *extra)
    _assert_one_line_error(done, keyword)
    assert not output_dir.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "magic", "labels"])
def test_bad_data_dir_names_the_file(kind: str, tmp_path):
    folder = _bad_data(tmp_path, kind)
    output_dir = tmp_path / "out"
    done = _run(*TINY, f"--data_dir={folder}", f"--output_dir={output_dir}", "--batch_size=8")
    expected = folder.name if kind == "empty" else "train-"
    _assert_one_line_error(done, expected)
    assert not output_dir.exists()


def test_valid_idx_folder_is_used(tmp_path):
    folder = _idx_folder(tmp_path / "idx")
    done = _run(*TINY, f"--data_dir={folder}", f"--output_dir={tmp_path / 'out'}", "--batch_size=8")
    assert done.returncode == 0, done.stderr
    dataset = json.loads((tmp_path / "out" / "results.json").read_text())["dataset"]
    assert (dataset["source"], dataset["train_size"], dataset["test_size"]) == ("idx", 20, 10)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = _run(*TINY, f"--output_dir={blocker / 'out'}")
    _assert_one_line_error(done, str(blocker / "out"))


def _assert_one_line_error(done: subprocess.CompletedProcess, keyword: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and keyword in lines[0], lines[0]

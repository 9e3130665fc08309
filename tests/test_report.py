"""Run records: strict, atomic results.json; metrics.csv rows; output-folder checks."""

from __future__ import annotations

import csv
import json
import os

import pytest

from sgjax.bench.report import learning_rate_schedule
from sgjax.training.loop import EvalRecord
from sgjax.training.records import (
    MetricsWriter,
    OutputError,
    metrics_columns,
    prepare_output_dir,
    write_json_atomic,
)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_results_json_is_strict_and_replaced_whole(tmp_path, umask_022):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "completed", "loss": 0.5})
    write_json_atomic(path, {"status": "diverged", "loss": float("nan"), "xs": [float("inf"), 1.0]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "status": "diverged",
        "loss": None,
        "xs": [None, 1.0],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, like any plain file


def test_metrics_rows_are_on_disk_as_soon_as_written(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.csv", metrics_columns(2))
    writer.write(EvalRecord(10, 3e-5, 1.5, 0.4, 1.2, 0.5, (1e-4, 2e-4), 3.25))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))  # before close()
    writer.close()
    assert rows == [
        {
            "step": "10",
            "learning_rate": "3e-05",
            "train_loss": "1.500000",
            "train_accuracy": "0.400000",
            "test_loss": "1.200000",
            "test_accuracy": "0.500000",
            "sg_loss_1": "0.0001",
            "sg_loss_2": "0.0002",
            "elapsed_s": "3.250",
        }
    ]


def test_synthetic_input_losses_get_one_column_per_boundary(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.csv", metrics_columns(2, 2))
    record = EvalRecord(10, 3e-5, 1.5, 0.4, 1.2, 0.5, (1e-4, 2e-4), 3.25, input_loss=(0.5, 0.25))
    writer.write(record)
    writer.close()
    (row,) = csv.DictReader((tmp_path / "metrics.csv").open())
    assert (row["sg_loss_2"], row["input_loss_1"], row["input_loss_2"]) == ("0.0002", "0.5", "0.25")


def test_the_benchmark_names_a_constant_learning_rate():
    assert learning_rate_schedule(()) == "constant"  # not "divided by 10 at ;"
    assert learning_rate_schedule((600, 800)) == "divided by 10 at 600, 800"


def test_output_folder_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="--output_dir"):
        prepare_output_dir(blocker / "out")
    assert prepare_output_dir(tmp_path / "new" / "dir").is_dir()

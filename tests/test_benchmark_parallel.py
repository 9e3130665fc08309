"""benchmark.py --parallel=layers: every schedule on 1 and 2 simulated devices, in one table;
honest status and exit code when a run diverges or is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from local_processes import FAST_COMPILE

from sgjax.cli.benchmark import define_flags, parallel_settings_from_flags
from sgjax.training.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--modes=bp,cdni",
    "--batch_size=32",
    "--hidden_layers=1",
    "--hidden_units=16",
    "--parallel_devices=1",
]


def _command(tmp_path: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "experiments" / "benchmark.py"),
        "--parallel=layers",
        f"--output_dir={tmp_path}",
        *SMALL,
        *flags,
    ]


ENV = os.environ | {"JAX_PLATFORMS": "cpu"}  # the fast compile of tests/conftest.py
# For a signal that must land while the command compiles: no executables from the session's
# compilation cache (tests/conftest.py), so every program compiles as in a fresh session (and
# at full length: not the fast compile).
COMPILING_ENV = ENV | {
    "JAX_ENABLE_COMPILATION_CACHE": "false",
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, ""),
}


def test_layer_parallel_benchmark_writes_every_variant(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--parallel=layers",
            "--parallel_devices=1,2",
            "--modes=bp,cdni",
            "--num_steps=10",
            "--eval_every=10",
            "--batch_size=32",
            "--hidden_layers=2",  # 3 stages: 2 of them share device 0 of 2
            "--hidden_units=16",
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=ENV,  # the script asks for simulated devices
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    variants = [(r["schedule"], r["devices"]) for r in rows]
    assert variants == [
        ("single", 1),
        ("single", 1),
        ("bp_model_parallel", 1),
        ("bp_model_parallel", 2),
        ("bp_gpipe", 1),
        ("bp_gpipe", 2),
        ("sg_pipeline", 1),
        ("sg_pipeline", 2),
    ]
    pipeline = rows[-1]
    assert pipeline["algorithm"] == "cdni" and pipeline["stage_devices"] == [0, 0, 1]
    assert len(pipeline["stage_ms"]) == 3 and pipeline["ideal_speedup"] > 1
    assert all(r["examples_per_s"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "cdni layer-parallel pipeline" in table and "share" in table
    assert "| to 0.9 x bp acc | to 0.99 x bp acc |" in table
    bp_accuracy = rows[0]["test_accuracy"]
    for row in rows:  # one evaluation (step 10): reached there or never, at its elapsed time
        (step, elapsed, accuracy), *_ = row["evaluations"]
        for reached, fraction in zip(row["time_to_accuracy"], (0.9, 0.99), strict=True):
            assert reached["threshold"] == pytest.approx(fraction * bp_accuracy)
            crossed = accuracy >= reached["threshold"]
            assert reached["steps"] == [step if crossed else None]
            assert reached["median_seconds"] == (elapsed if crossed else None)
    assert rows[0]["time_to_accuracy"][1]["steps"] == [10]  # bp reaches its own accuracy


@pytest.mark.parametrize(
    ("args", "mode", "unlocked"),
    [
        (["--modes=bp,cdni_unlock"], "cdni", True),
        (["--modes=bp,sg", "--synthetic_inputs"], "sg", True),
        (["--modes=bp,dgl", "--synthetic_inputs"], "dgl", False),
        (["--modes=bp,cdni"], "cdni", False),
    ],
)
def test_the_complete_unlock_is_a_decoupled_column_of_the_comparison(args, mode, unlocked):
    """The unlock's pipeline runs under --parallel=layers, so the comparison takes it as its
    decoupled column (by name or with --synthetic_inputs); backprop stays plain."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["prog", "--parallel=layers", *args])
    settings = parallel_settings_from_flags(fv)
    assert (settings.sg.mode, settings.sg.synthetic_inputs) == (mode, unlocked)
    assert (settings.bp.mode, settings.bp.synthetic_inputs) == ("bp", False)


def test_the_comparison_needs_a_decoupled_mode():
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["prog", "--parallel=layers", "--modes=bp"])
    with pytest.raises(ConfigError, match="needs a decoupled mode"):
        parallel_settings_from_flags(fv)


def test_a_diverging_run_makes_the_comparison_exit_3_and_its_row_is_marked(tmp_path):
    done = subprocess.run(
        _command(tmp_path, "--learning_rate=1e38", "--num_steps=6", "--eval_every=2"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=ENV,
    )
    assert done.returncode == 3, done.stderr
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["status"] == "diverged"
    statuses = {r["variant"]: r["status"] for r in result["rows"]}
    assert "diverged" in statuses.values(), statuses
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0], done.stderr
    table = (tmp_path / "table.md").read_text()
    assert "Status: diverged" in table and "(diverged:" in table


def test_ctrl_c_while_compiling_stops_with_one_line_and_exit_130(tmp_path):
    """SIGINT as soon as the first run starts compiling: no traceback, no further runs, the
    stopped row marked, status interrupted, exit 130."""
    proc = subprocess.Popen(
        _command(tmp_path, "--num_steps=400", "--eval_every=200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=COMPILING_ENV,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "single device (scanned) on 1 device(s) ..." in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "stopped after step" in last, err
    # It says how to start again, not a --resume that the comparison would refuse.
    assert "--overwrite" in last and "--resume" not in last, err
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["status"] == "interrupted"
    assert [r["status"] for r in result["rows"]] == ["interrupted"]
    assert "(interrupted:" in (tmp_path / "table.md").read_text()


def test_a_second_ctrl_c_while_compiling_stops_at_once_with_one_line(tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, "--num_steps=400", "--eval_every=200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=COMPILING_ENV,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "single device (scanned) on 1 device(s) ..." in line:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["status"] == "interrupted"
    assert [r["status"] for r in result["rows"]] == ["interrupted"]

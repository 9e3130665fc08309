"""benchmark.py --parallel=layers: every schedule on 1 and 2 simulated devices, in one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
            "--hidden_units=16",
            f"--output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},  # the script asks for simulated devices
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
    assert pipeline["algorithm"] == "cdni" and pipeline["stage_devices"] == [0, 0, 1, 1]
    assert len(pipeline["stage_ms"]) == 4 and pipeline["ideal_speedup"] > 1
    assert all(r["examples_per_s"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "cdni layer-parallel pipeline" in table and "share" in table

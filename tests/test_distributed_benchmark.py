"""The benchmark under jax.distributed: 2 and 4 local processes (one simulated device each)
compute every run's metrics as one process does, and only process 0 writes them.

The three launches run at the same time, on the smallest benchmark that still trains 4 seeds
(one seed per device with 4 processes) of one mode, cDNI (every part: network, label-conditioned
synthesizers, data): 7 JAX processes compile on the CPU, and each further mode would cost every
one of them another compile.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from local_processes import xla_flags

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--modes=cdni",
    "--num_seeds=4",
    "--num_steps=4",
    "--eval_every=2",
    "--batch_size=8",
    "--hidden_layers=1",
    "--hidden_units=8",
    "--sg_hidden_layers=0",
    "--loop_steps=0",
    "--compare_separate=false",
]
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags(1),
)
RTOL, ATOL = 1e-5, 1e-7


def _benchmark(processes: int, folder: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "experiments" / "benchmark.py"),
        *TINY,
        f"--output_dir={folder}",
    ]
    if processes > 1:
        launcher = [str(REPO / "tools" / "launch_local.sh"), str(processes)]
        command = [*launcher, *command, "--distributed", "--distributed_timeout=60"]
    return subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_two_and_four_processes_give_the_single_process_metrics(tmp_path):
    counts = (1, 2, 4)
    with concurrent.futures.ThreadPoolExecutor(len(counts)) as pool:
        futures = {n: pool.submit(_benchmark, n, tmp_path / f"p{n}") for n in counts}
        done = {n: future.result() for n, future in futures.items()}
    for n, completed in done.items():
        assert completed.returncode == 0, (n, completed.stderr[-3000:])
    single = json.loads((tmp_path / "p1" / "benchmark.json").read_text())
    assert [p["mode"] for p in single["programs"]] == ["cdni"]
    for n in counts[1:]:
        folder = tmp_path / f"p{n}"
        stdout = done[n].stdout
        # Only process 0 wrote: the same files as one process, and only its "wrote" line.
        assert _files(folder) == _files(tmp_path / "p1"), n
        assert "[0] wrote " in stdout
        assert not any(f"[{i}] wrote " in stdout for i in range(1, n)), stdout[-3000:]
        for i in range(1, n):
            assert f"[{i}] benchmark took" in stdout, (n, i)
        result = json.loads((folder / "benchmark.json").read_text())
        assert result["status"] == "completed"
        assert result["device"]["process_count"] == n
        assert len(result["programs"]) == len(single["programs"])
        for got, want in zip(result["programs"], single["programs"], strict=True):
            assert got["mode"] == want["mode"] and got["seeds"] == want["seeds"] == [0, 1, 2, 3]
            assert got["num_devices"] == n
            assert got["history"].keys() == want["history"].keys()
            for name, values in want["history"].items():
                np.testing.assert_allclose(
                    np.asarray(got["history"][name], np.float64),
                    np.asarray(values, np.float64),
                    rtol=RTOL,
                    atol=ATOL,
                    err_msg=f"{n} processes, {want['mode']}: {name}",
                )
        for got, want in zip(result["rows"], single["rows"], strict=True):
            assert got["label"] == want["label"]
            for name in ("test_accuracy_per_seed", "test_accuracy_mean", "test_loss_mean"):
                np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL)

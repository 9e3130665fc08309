"""A multi-process run whose process 0 (the coordinator) dies: the others stop with one line.

Two processes of a tiny single-device run under jax.distributed; process 0 is killed once
process 1 trains. Process 1 must end by itself within seconds, exit code 1, its last line ours
and none of jaxlib's fatal output (process 0 no longer hosts the coordination service, see
sgjax/cli/distributed.py).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from local_processes import start_processes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5
STOP_WITHIN_S = 10  # the connection to process 0 closes at once; the rest is slack
FATAL_MARKS = ("Traceback", "Check failed", "*** ", "Fatal Python error", "terminate called")


def test_death_of_process_0_stops_the_other_with_one_line(tmp_path):
    command = [
        sys.executable,
        str(REPO / "experiments" / "mnist_mlp.py"),
        "--distributed",
        f"--distributed_timeout={TIMEOUT_S}",
        "--mode=bp",
        "--hidden_layers=1",
        "--hidden_units=8",
        "--batch_size=8",
        "--num_steps=1000000",  # far more than it will run
        "--eval_every=100000",
        "--chunk_steps=20",
        "--checkpoint_every=0",
        f"--output_dir={tmp_path / 'run'}",
    ]
    processes = start_processes(command, 2, 1)
    guard = threading.Timer(120, lambda: [p.kill() for p in processes])  # bounded, whatever
    guard.start()
    try:
        for line in processes[1].stdout:
            if line.startswith("step "):  # process 1 trains
                break
        processes[0].kill()
        killed = time.monotonic()
        _, stderr = processes[1].communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        guard.cancel()
        for process in processes:
            process.kill()
            process.communicate()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert processes[1].returncode == 1, stderr[-3000:]
    assert stopped_after < STOP_WITHIN_S, stopped_after
    assert lines and lines[-1].startswith("error: process 1 stops: process 0 (the coordinator)")
    for mark in FATAL_MARKS:
        assert mark not in stderr, stderr[-3000:]
    assert not any(line[:1] in "FE" and line[1:5].isdigit() for line in lines), lines  # glog

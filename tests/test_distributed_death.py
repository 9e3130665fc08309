"""A process of a multi-process run dies (process 0, which hosts JAX's coordination service, or
process 1): the other ends by itself within the bound that --distributed_timeout states, and
tools/launch_local.sh ends with one line naming the process that failed and how.

Two processes of a tiny single-device run under tools/launch_local.sh; the victim is killed
with SIGKILL once the other trains. The survivor may end with jaxlib's own fatal message
(SIGABRT; once, on a loaded machine, SIGSEGV inside jaxlib) or with sgjax's one line (exit code
1); either way within the bound, and the launcher's line names how.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from local_processes import xla_flags

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 8  # --distributed_timeout: joining, JAX's heartbeats, the shutdown wait
# Process 0's death ends the other at once (its JAX client loses the service); another
# process's death is noticed by the service after TIMEOUT_S of missed heartbeats. Measured
# (BUILD_NOTES.md): 0.15-2.2 s and 5.4-8.4 s; the rest is slack for a loaded machine.
STOP_WITHIN_S = {0: 8, 1: TIMEOUT_S + 8}
SURVIVOR_ENDS = ("killed by signal SIGABRT", "killed by signal SIGSEGV", "exit code 1")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_process_ends_the_other_and_launch_local_names_it(tmp_path, victim):
    survivor = 1 - victim
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
    # Each process prints its pid first (the shell execs into the command: the same pid).
    show_pid = ["sh", "-c", 'echo "pid $$"; exec "$0" "$@"']
    launcher = subprocess.Popen(
        [str(REPO / "tools" / "launch_local.sh"), "2", *show_pid, *command],
        env=dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=xla_flags(1),
            SGJAX_LAUNCH_GRACE="60",  # longer than the bound: the survivor must end by itself
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(launcher.stderr), daemon=True)
    reader.start()
    guard = threading.Timer(120, launcher.kill)  # bounded, whatever happens
    guard.start()
    try:
        pids = {}
        for line in launcher.stdout:
            words = line.split()
            if words[1:2] == ["pid"]:
                pids[int(words[0].strip("[]"))] = int(words[2])
            if line.startswith(f"[{survivor}] step "):  # the survivor trains
                break
        os.kill(pids[victim], signal.SIGKILL)
        killed = time.monotonic()
        launcher.stdout.read()
        launcher.wait(timeout=100)
        ended_after = time.monotonic() - killed
    finally:
        guard.cancel()
        launcher.kill()
        launcher.wait()
        reader.join(timeout=10)
    lines = [line.rstrip("\n") for line in stderr if line.strip()]
    print(f"ended {ended_after:.2f} s after process {victim} was killed: {lines[-1:]}")
    text = "".join(stderr)[-3000:]
    assert launcher.returncode == 128 + signal.SIGKILL, text
    assert ended_after < STOP_WITHIN_S[victim], (ended_after, text)
    failed = [line for line in lines if line.startswith("launch_local:")]
    assert len(failed) == 1, text
    assert failed == lines[-1:], text
    head = f"launch_local: process {victim} of 2 failed first: killed by signal SIGKILL"
    assert any(lines[-1] == f"{head}; then process {survivor}: {how}" for how in SURVIVOR_ENDS), (
        lines[-1]
    )

"""Start JAX processes for the tests: a test file run as a script on simulated CPU devices
(``script_json``), or the processes of one ``jax.distributed`` run on this machine, for the tests
that kill one of them (tools/launch_local.sh is the way to run those otherwise)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

# Every test process's XLA flags (tests/conftest.py sets them).
FAST_COMPILE = "--xla_backend_optimization_level=0"
ONE_EIGEN_THREAD = "--xla_cpu_multi_thread_eigen=false"


def xla_flags(devices: int) -> str:
    """The session's XLA_FLAGS (tests/conftest.py: the fast compile) with ``devices`` simulated
    CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def script_json(
    path: str, devices: int, full_compile: bool = False, timeout_s: float = 600
) -> dict[str, Any]:
    """Run the test file ``path`` as a script with ``devices`` simulated CPU devices (the flag
    must be set before JAX starts); the JSON object it prints on its last line. With
    ``full_compile``, XLA's default optimisation instead of the fast compile: for a script
    whose run, not its compile, is most of its time."""
    flags = xla_flags(devices)
    env = dict(
        os.environ,
        XLA_FLAGS=flags.replace(FAST_COMPILE, "").strip() if full_compile else flags,
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run(
        [sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_processes(command: list[str], count: int, devices: int) -> list[subprocess.Popen]:
    """``count`` processes of ``command``, each told the coordinator, the process count and its
    id, with ``devices`` simulated CPU devices; text pipes for stdout and stderr."""
    port = free_port()
    return [
        subprocess.Popen(
            command,
            env=dict(
                os.environ,
                XLA_FLAGS=xla_flags(devices),
                JAX_PLATFORMS="cpu",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(count),
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]

"""JAX's coordination service for a ``--distributed`` run, in a process of its own.

Process 0 starts this script (``sgjax.cli.distributed``) instead of hosting the service itself:
when process 0 dies, the service lives on, so the other processes' JAX clients do not end them
at once with jaxlib's multi-line fatal message; they stop with one line of ours instead
(``CoordinatorWatch`` there). Only the standard library and jaxlib are imported (a quick start).

Usage: ``python coordination_service.py BIND_ADDRESS NUM_PROCESSES HEARTBEAT_S SHUTDOWN_S
LINGER_S``. Prints ``ready`` (or ``error: ...``, one line) on stdout, then reads stdin until
process 0 closes it: after a ``done`` line (a normal finish, process 0's client has shut down)
the service shuts down; without one (process 0 died) it stays LINGER_S seconds more, long enough
for the others to notice and stop by themselves, and the process ends.
"""

from __future__ import annotations

import os
import sys
import time

GRACE_S = 1.0  # after a normal finish, for the other clients' last calls


def main(argv: list[str]) -> int:
    bind, count, heartbeat_s, shutdown_s, linger_s = argv[1:6]
    try:
        from jaxlib import _jax

        service = _jax.get_distributed_runtime_service(
            bind, int(count), heartbeat_timeout=int(heartbeat_s), shutdown_timeout=int(shutdown_s)
        )
    except Exception as error:  # noqa: BLE001 (jaxlib raises several kinds)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"error: the coordination service could not start on {bind}: {first}", flush=True)
        return 1
    print("ready", flush=True)
    lines = [line.strip() for line in sys.stdin]  # every line: until process 0 has exited
    finished = "done" in lines
    if not finished:
        time.sleep(float(linger_s))
        os._exit(0)  # no orderly shutdown: it would wait for clients that are gone
    time.sleep(GRACE_S)
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

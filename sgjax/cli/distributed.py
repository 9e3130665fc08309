"""``--distributed``: one process per host (or several local ones), joined by
``jax.distributed.initialize``; placement from flags, else ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS`` (``tools/launch_local.sh``
sets them). CPU collectives go through gloo, so several processes run on one machine.

``--distributed_timeout`` (T s) bounds joining, JAX's heartbeats and the shutdown barrier: when a
process dies the others end within about T + 1 s, at once if it is process 0 (the coordination
service), else when a collective with it fails (``stop_process``) or its heartbeats stop (jaxlib
ends the process itself, SIGABRT). See BUILD_NOTES.md."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

from absl import flags

from sgjax.training.config import ConfigError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 60
EXIT_PEER_LOST = 1


class Cluster(NamedTuple):
    address: str
    num_processes: int
    process_id: int
    timeout_s: int
    local_device_ids: tuple[int, ...] | None = None


def define_distributed_flags(fv: flags.FlagValues, with_switch: bool = True) -> None:
    """``--distributed`` (unless ``with_switch`` is False) and the flags that place a process."""
    defines = [
        (flags.DEFINE_string, "coordinator_address", None,
         f"host:port of process 0, for --distributed (default: ${ENV_ADDRESS})."),
        (flags.DEFINE_integer, "num_processes", None,
         f"Processes in the run, for --distributed (default: ${ENV_COUNT})."),
        (flags.DEFINE_integer, "process_id", None,
         f"This process's id, 0 to --num_processes - 1 (default: ${ENV_ID})."),
        (flags.DEFINE_list, "local_device_ids", None,
         "This process's accelerators, e.g. 0,1, for --distributed (default: "
         "$JAX_LOCAL_DEVICE_IDS, else what JAX detects on a cluster, else all of them)."),
        (flags.DEFINE_integer, "distributed_timeout", DEFAULT_TIMEOUT_S,
         "Seconds, for --distributed, to wait for the other processes to join, JAX's heartbeat "
         "timeout and the shutdown wait: when a process dies, the others end within about this "
         "long (at once if it is process 0)."),
    ]  # fmt: skip
    switch = (flags.DEFINE_boolean, "distributed", False,
              "Join a multi-process run with jax.distributed.initialize (see "
              "--coordinator_address).")  # fmt: skip
    for define, name, default, text in [switch] * with_switch + defines:
        define(name, default, text, flag_values=fv)


def _integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def cluster_from(
    address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int,
    local_device_ids: Sequence[str | int] | None = None,
) -> Cluster:
    """The run's placement from flags, else the environment; ConfigError if missing or bad."""
    address = address or os.environ.get(ENV_ADDRESS)
    if num_processes is None and os.environ.get(ENV_COUNT):
        num_processes = _integer(f"${ENV_COUNT}", os.environ[ENV_COUNT])
    if process_id is None and os.environ.get(ENV_ID):
        process_id = _integer(f"${ENV_ID}", os.environ[ENV_ID])
    missing = [
        f"--{flag} (or ${env})"
        for flag, env, value in (
            ("coordinator_address", ENV_ADDRESS, address),
            ("num_processes", ENV_COUNT, num_processes),
            ("process_id", ENV_ID, process_id),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(f"--distributed needs {', '.join(missing)}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address {address!r} must be host:port")
    if num_processes < 1:
        raise ConfigError(f"--num_processes={num_processes} must be positive")
    if not 0 <= process_id < num_processes:
        last = num_processes - 1
        raise ConfigError(
            f"--process_id={process_id} must be between 0 and --num_processes - 1 ({last})"
        )
    if timeout_s < 1:
        raise ConfigError(f"--distributed_timeout={timeout_s} must be at least 1 second")
    ids = None
    if local_device_ids:
        ids = tuple(_integer("--local_device_ids", str(i).strip()) for i in local_device_ids)
    return Cluster(address, num_processes, process_id, timeout_s, ids)


def _exit_with(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def _first_line(error: BaseException, limit: int) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def initialize(cluster: Cluster) -> None:
    """Join the run (gloo collectives on the CPU). If the others do not join in time, jaxlib 0.10.2
    ends the process itself (SIGABRT, about ``timeout_s`` + 5 s in); an error it raises instead
    (e.g. an unparsable address) ends it with one line, exit code 1."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            cluster.address, cluster.num_processes, cluster.process_id,
            local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
            initialization_timeout=cluster.timeout_s, heartbeat_timeout_seconds=cluster.timeout_s,
            shutdown_timeout_seconds=cluster.timeout_s,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 (jaxlib raises several kinds)
        _exit_with(
            f"process {cluster.process_id} of {cluster.num_processes} could not join the run at "
            f"{cluster.address} within {cluster.timeout_s} s: {_first_line(error, 300)}"
        )


def initialize_from_flags(fv: flags.FlagValues) -> None:
    """``initialize`` if ``--distributed`` was given (ConfigError for bad placement flags)."""
    if fv.distributed:
        names = ("coordinator_address", "num_processes", "process_id", "distributed_timeout")
        initialize(cluster_from(*(fv[name].value for name in names), fv.local_device_ids))


def stop_process(error: BaseException) -> None:
    """End this process with one line about ``error`` (exit 1), not waiting for the others."""
    import jax

    name = type(error).__name__
    _exit_with(f"process {jax.process_index()} stops: {name}: {_first_line(error, 200)}")

"""``--distributed``: one process per host (or several local ones), joined by jax.distributed.

The coordinator's address, the number of processes and this process's id come from flags or,
when the flags are not given, from the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what ``tools/launch_local.sh`` sets). CPU
collectives go through gloo, so the same commands run as several processes on one machine.
Every wait is bounded by ``--distributed_timeout``: joining, and the watch by which a process
that died is noticed by the others (they then stop with one line, exit code 1; ``PeerWatch``).
If the one that died is process 0, which hosts JAX's coordination service, JAX's runtime ends
the others at once itself, with its own (multi-line) fatal message and SIGABRT: its hook for a
lost coordinator (``missed_heartbeat_callback``) is not usable from Python in this jaxlib.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
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


def define_distributed_flags(fv: flags.FlagValues, with_switch: bool = True) -> None:
    """``--distributed`` (unless ``with_switch`` is False) and the flags that place a process."""
    if with_switch:
        flags.DEFINE_boolean(
            "distributed",
            False,
            "Join a multi-process run with jax.distributed (see --coordinator_address).",
            flag_values=fv,
        )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        f"host:port of process 0, for --distributed (default: ${ENV_ADDRESS}).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        f"Processes in the run, for --distributed (default: ${ENV_COUNT}).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        f"This process's id, 0 to --num_processes - 1 (default: ${ENV_ID}).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "distributed_timeout",
        DEFAULT_TIMEOUT_S,
        "Seconds to wait for the other processes to join, and to notice one that died.",
        flag_values=fv,
    )


def _integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} must be an integer") from None


def cluster_from(
    address: str | None, num_processes: int | None, process_id: int | None, timeout_s: int
) -> Cluster:
    """The run's placement from flags, else the environment; ConfigError (one line) if
    something is missing or impossible."""
    address = address or os.environ.get(ENV_ADDRESS)
    if num_processes is None and os.environ.get(ENV_COUNT):
        num_processes = _integer(ENV_COUNT, os.environ[ENV_COUNT])
    if process_id is None and os.environ.get(ENV_ID):
        process_id = _integer(ENV_ID, os.environ[ENV_ID])
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
        raise ConfigError(
            f"--process_id={process_id} must be between 0 and --num_processes - 1 "
            f"({num_processes - 1})"
        )
    if timeout_s < 1:
        raise ConfigError(f"--distributed_timeout={timeout_s} must be at least 1 second")
    return Cluster(address, num_processes, process_id, timeout_s)


def initialize(cluster: Cluster) -> None:
    """Join the run (gloo collectives on the CPU); one line and exit code 1 if the others do
    not join within the timeout."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            cluster.address,
            cluster.num_processes,
            cluster.process_id,
            initialization_timeout=cluster.timeout_s,
            heartbeat_timeout_seconds=2 * cluster.timeout_s + 10,
            shutdown_timeout_seconds=cluster.timeout_s,
        )
    except Exception as error:  # noqa: BLE001 (jaxlib raises several kinds)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"error: process {cluster.process_id} of {cluster.num_processes} could not join "
            f"the run at {cluster.address} within {cluster.timeout_s} s: {first}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_LOST)
    if cluster.num_processes > 1:
        from jax._src import distributed as jax_distributed

        watch = PeerWatch(cluster, jax_distributed.global_state.client).start()
        atexit.register(watch.stop)  # runs before JAX's own shutdown (registered earlier)


def initialize_from_flags(fv: flags.FlagValues) -> None:
    """``initialize`` if ``--distributed`` was given (ConfigError for bad placement flags)."""
    if not fv.distributed:
        return
    initialize(
        cluster_from(
            fv.coordinator_address, fv.num_processes, fv.process_id, fv.distributed_timeout
        )
    )


def stop_process(error: BaseException) -> None:
    """End this process of a multi-process run with one line about ``error`` (exit code 1),
    without waiting for the others at shutdown."""
    import jax

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(
        f"error: process {jax.process_index()} stops: {type(error).__name__}: {first[:200]}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_PEER_LOST)


def is_writer() -> bool:
    """Whether this process writes results (process 0; every process when not distributed)."""
    import jax

    return jax.process_index() == 0


class PeerWatch:
    """Notices a process of the run that died, and ends this one with one line (exit code 1).

    Every process counts up a key in the coordinator's key-value store every
    ``timeout_s / 4`` seconds; a peer whose count has not moved for ``timeout_s`` seconds, or a
    coordinator that no longer answers, ends this process, even while its main thread waits in
    a collective. A process that finishes normally says so first (``stop``). JAX's own
    heartbeat timeout is set longer, so this one line comes first.
    """

    def __init__(self, cluster: Cluster, client: object) -> None:
        self.cluster = cluster
        self.client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="sgjax-peers")

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """This process is done: tell the others, stop watching."""
        self._stop.set()
        try:
            self.client.key_value_set(f"sgjax/done/{self.cluster.process_id}", "1", True)
        except Exception:  # noqa: BLE001 (the coordinator may be gone already)
            pass

    def _fail(self, why: str) -> None:
        print(
            f"error: process {self.cluster.process_id} stops: {why} (--distributed_timeout="
            f"{self.cluster.timeout_s})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_LOST)

    def _watch(self) -> None:
        me, count = self.cluster.process_id, 0
        peers = [p for p in range(self.cluster.num_processes) if p != me]
        seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in peers}
        period = max(self.cluster.timeout_s / 4, 0.5)
        while not self._stop.wait(period):
            count += 1
            try:
                self.client.key_value_set(f"sgjax/alive/{me}", str(count), True)
                for p in peers:
                    done = _try_get(self.client, f"sgjax/done/{p}")
                    if done is not None:
                        continue
                    value = _try_get(self.client, f"sgjax/alive/{p}")
                    last, since = seen[p]
                    now = time.monotonic()
                    if value != last:
                        seen[p] = (value, now)
                    elif now - since > self.cluster.timeout_s:
                        self._fail(f"process {p} has not been heard from for {now - since:.0f} s")
            except Exception as error:  # noqa: BLE001 (the coordinator, process 0, is gone)
                if self._stop.is_set():
                    return
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self._fail(f"the coordinator (process 0) does not answer: {first[:120]}")


def _try_get(client: object, key: str) -> str | None:
    """The value of ``key``, or None if it was never set."""
    try:
        return client.key_value_try_get(key)
    except Exception as error:  # noqa: BLE001
        if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
            return None
        raise

"""``--distributed``: one process per host (or several local ones), joined by jax.distributed.

The coordinator's address, the number of processes and this process's id come from flags or,
when the flags are not given, from the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (what ``tools/launch_local.sh`` sets). CPU
collectives go through gloo, so the same commands run as several processes on one machine.
Every wait is bounded by ``--distributed_timeout``: joining, and the watch by which a process
that died is noticed by the others (they then stop with one line, exit code 1; ``PeerWatch``).

Process 0 does not host JAX's coordination service itself but starts it as a process of its own
(``coordination_service.py``): if the service died with process 0, jaxlib would end the others
at once with its own multi-line fatal message and SIGABRT (its hook for that,
``missed_heartbeat_callback``, fails with std::bad_cast when given a Python function in this
jaxlib, and the error polling that calls it cannot be turned off from Python). Instead every
other process holds a TCP connection to process 0 (``CoordinatorWatch``); when it closes without
process 0's "done", they stop at once with one line, exit code 1.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from absl import flags

from sgjax.training.config import ConfigError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 60
EXIT_PEER_LOST = 1
WATCH_KEY = "sgjax/coordinator_watch_port"
DONE = b"done"


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
    not join within the timeout. With several processes, process 0 starts the coordination
    service as a process of its own, and the watches (``PeerWatch``, ``CoordinatorWatch``)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat_s = 2 * cluster.timeout_s + 10
    try:
        if cluster.num_processes == 1:
            jax.distributed.initialize(
                cluster.address,
                1,
                0,
                initialization_timeout=cluster.timeout_s,
                heartbeat_timeout_seconds=heartbeat_s,
                shutdown_timeout_seconds=cluster.timeout_s,
            )
            return
        service = _start_service(cluster, heartbeat_s) if cluster.process_id == 0 else None
        client = _connect(cluster, heartbeat_s)
        coordinator = CoordinatorWatch(cluster, client, service).start()
    except Exception as error:  # noqa: BLE001 (jaxlib raises several kinds)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"error: process {cluster.process_id} of {cluster.num_processes} could not join "
            f"the run at {cluster.address} within {cluster.timeout_s} s: {first}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_LOST)
    peers = PeerWatch(cluster, client).start()
    atexit.register(coordinator.stop)  # both run before JAX's own shutdown (registered earlier)
    atexit.register(peers.stop)


def _start_service(cluster: Cluster, heartbeat_s: int) -> subprocess.Popen[str]:
    """Process 0: JAX's coordination service in a process of its own (coordination_service.py),
    started in its own session (a Ctrl-C reaches process 0 only), once it listens."""
    port = cluster.address.rpartition(":")[2]
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
    # After process 0's death the service stays this long: the others' CoordinatorWatch stops
    # them at once, their PeerWatch (if process 0 was unreachable) within that.
    linger_s = 1.5 * cluster.timeout_s + 5
    service = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("coordination_service.py")), bind]
        + [str(cluster.num_processes), str(heartbeat_s), str(cluster.timeout_s), str(linger_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    ready, _, _ = select.select([service.stdout], [], [], cluster.timeout_s)
    line = service.stdout.readline().strip() if ready else ""
    if line != "ready":
        service.kill()
        raise RuntimeError(line or "the coordination service did not start")
    return service


def _connect(cluster: Cluster, heartbeat_s: int) -> Any:
    """What ``jax.distributed.initialize`` does for a process that does not host the service
    (jax._src.distributed.State.initialize, jax 0.10.2): connect a client, record it in JAX's
    global state (where the gloo collectives find it), start the preemption sync manager."""
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    state = jax_distributed.global_state
    if xla_bridge.backends_are_initialized() or state.client is not None:
        raise RuntimeError("jax.distributed must be initialized once, before any JAX call")
    state.coordinator_address = cluster.address
    state.process_id = cluster.process_id
    state.num_processes = cluster.num_processes
    state.client = _jax.get_distributed_runtime_client(
        cluster.address,
        cluster.process_id,
        init_timeout=cluster.timeout_s,
        shutdown_timeout=cluster.timeout_s,
        heartbeat_timeout=heartbeat_s,
        use_compression=True,
    )
    state.client.connect()
    state.initialize_preemption_sync_manager()
    return state.client


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
            except Exception as error:  # noqa: BLE001 (the coordination service is gone)
                if self._stop.is_set():
                    return
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self._fail(f"the coordination service does not answer: {first[:120]}")


def _try_get(client: object, key: str) -> str | None:
    """The value of ``key``, or None if it was never set."""
    try:
        return client.key_value_try_get(key)
    except Exception as error:  # noqa: BLE001
        if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
            return None
        raise


class CoordinatorWatch:
    """Ends every other process with one line (exit code 1) as soon as process 0 dies.

    Process 0 listens on a TCP port of its own (published in the coordination service's
    key-value store); every other process keeps one connection to it, read by a daemon thread.
    A normal finish of process 0 (``stop``) sends "done" on each connection and tells the
    coordination service's process (``service``) to shut down once process 0 exits; a
    connection that closes without "done" means process 0 died.
    """

    def __init__(
        self, cluster: Cluster, client: Any, service: subprocess.Popen[str] | None
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.service = service
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._socket: socket.socket | None = None

    def start(self) -> CoordinatorWatch:
        """Listen (process 0) or connect (the others), within the run's timeout."""
        host = self.cluster.address.rpartition(":")[0].strip("[]")
        if self.cluster.process_id == 0:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._socket = socket.create_server(("", 0), family=family)
            self.client.key_value_set(WATCH_KEY, str(self._socket.getsockname()[1]))
            target = self._accept
        else:
            port = self.client.blocking_key_value_get(WATCH_KEY, 1000 * self.cluster.timeout_s)
            try:
                self._socket = socket.create_connection((host, int(port)), self.cluster.timeout_s)
            except OSError as error:  # e.g. a firewall: PeerWatch still notices, more slowly
                print(
                    f"warning: process {self.cluster.process_id} cannot reach process 0 at "
                    f"{host}:{port} ({error.strerror or type(error).__name__}); its death will "
                    f"be noticed within --distributed_timeout={self.cluster.timeout_s} s",
                    file=sys.stderr,
                    flush=True,
                )
                return self
            self._socket.settimeout(None)
            target = self._watch
        threading.Thread(target=target, daemon=True, name="sgjax-coordinator").start()
        return self

    def stop(self) -> None:
        """This process is done (process 0: tell the others and the service's process)."""
        self._stopping.set()
        if self.cluster.process_id != 0:
            return
        with self._lock:
            for connection in self._connections:
                try:
                    connection.sendall(DONE)
                except OSError:  # that process has finished already
                    pass
        if self.service is not None and self.service.stdin is not None:
            try:
                self.service.stdin.write("done\n")
                self.service.stdin.flush()  # closed when this process exits
            except OSError:
                pass

    def _accept(self) -> None:
        assert self._socket is not None
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(connection)

    def _watch(self) -> None:
        assert self._socket is not None
        received = b""
        try:
            while chunk := self._socket.recv(64):
                received += chunk
                if DONE in received:
                    return
            why = "its connection closed"
        except OSError as error:
            why = f"its connection failed: {error.strerror or type(error).__name__}"
        if self._stopping.is_set():
            return
        os.write(
            2,
            f"error: process {self.cluster.process_id} stops: process 0 (the coordinator) is "
            f"gone ({why} before the run finished)\n".encode(),
        )
        os._exit(EXIT_PEER_LOST)

"""Hermetic tests: every test, and every subprocess a test starts, uses the embedded MNIST.

``SGJAX_NO_TFDS=1`` makes ``sgjax.data.sources.load_dataset`` skip TFDS without importing it or
probing the network, so a machine with network access or TensorFlow runs the same tests on the
same data as an offline one. It is set when this file is imported, before any test module builds
its subprocess environment from ``os.environ``. Tests of the TFDS path remove it themselves.

One XLA compilation per program per test session: JAX's persistent compilation cache, in a
folder made fresh for the session (``JAX_COMPILATION_CACHE_DIR``, set here before JAX starts and
inherited by the pytest-xdist workers and by every subprocess), so that the runs that compile the
same program again (a resumed run, the second run of a determinism check, a command run once
more) load the first compile's executable instead of compiling it anew. Nothing is read from an
earlier session: each session still compiles every program at least once. Tests whose signal
must land while a command compiles run that command with ``JAX_ENABLE_COMPILATION_CACHE=false``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"

_OWN_CACHE = CACHE_ENV not in os.environ or "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CACHE:  # the session's first process (xdist workers inherit the controller's folder)
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="sgjax-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Every test process compiles with LLVM's optimisations off (XLA's own passes still run), set here
# before JAX starts and inherited by the xdist workers and every subprocess: the suite's programs
# are tiny, so compilation is most of what it costs, and this cut the fast core's CPU time by a
# third (BUILD_NOTES.md). It rounds some sums differently from a default build, so every
# comparison of two runs is between processes with the same flags. Give XLA_FLAGS an
# optimisation level of your own to run the suite at it.
#
# And with single-threaded Eigen (the same numbers, bitwise: BUILD_NOTES.md, "XLA flags"), one
# thread a process for two xdist workers on two cores.
from local_processes import FAST_COMPILE, ONE_EIGEN_THREAD  # noqa: E402

for flag in (FAST_COMPILE, ONE_EIGEN_THREAD):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

from sgjax.data.sources import NO_TFDS_ENV  # noqa: E402 (after the cache folder is set)

os.environ[NO_TFDS_ENV] = "1"


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)


SLOW_FILES = frozenset(
    {
        "test_benchmark.py",
        "test_benchmark_grid.py",
        "test_benchmark_parallel.py",
        "test_benchmark_resume.py",
        "test_cli.py",
        "test_cli_cnn.py",
        "test_cnn.py",
        "test_decoupling_runs.py",
        "test_distributed_benchmark.py",
        "test_distributed_death.py",
        "test_flags_fuzz.py",
        "test_parallel.py",
        "test_parallel_cnn.py",
        "test_parallel_spmd.py",
        "test_parallel_unlock.py",
        "test_readme.py",
        "test_recurrent_learning.py",
        "test_resume.py",
        "test_rnn_runs.py",
        "test_train.py",
    }
)
"""Learning runs, subprocesses, multi-device and multi-process scripts: marked ``slow``, so
``pytest -m "not slow"`` runs the fast core (the Trainer, the methods, recurrent DNI, data,
tasks, reports) in about 1.5 minutes."""


def pytest_collection_modifyitems(config, items) -> None:
    import pytest

    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)

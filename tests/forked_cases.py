"""Run a command-line script once per argument list, each run in its own forked process, after
one Python start has imported the heavy libraries: the runs of many bad inputs cost one
interpreter and one ``import jax`` instead of one each.

``forked_runs`` starts ``python tests/forked_cases.py SCRIPT CASES_JSON`` (CASES_JSON maps a
case name to the script's arguments; it prints name -> returncode, stdout, stderr). Each child
runs SCRIPT as ``__main__`` (``runpy``) with a fresh ``sys.argv``, its own stdout and stderr
files (file descriptors 1 and 2, so output from C++ counts too), and the exit status Python's
own handling of ``SystemExit`` or of an uncaught exception would give; no flag, module state
or JAX backend is shared between cases (the parent only imports; it initialises no backend).
What a child does not do that a fresh interpreter would: run ``atexit`` handlers and wait for
non-daemon threads before it exits (``os._exit``); meant for runs that stop at their input.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sgjax.cli.benchmark  # noqa: F401 (imported once, before forking: what each run needs)
import sgjax.cli.train  # noqa: F401


def _exit_code(stop: SystemExit) -> int:
    """What Python exits with on ``stop`` (a message is printed to stderr and gives 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _child(script: str, args: list[str], out: Path, err: Path) -> None:
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = _exit_code(stop)
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught one)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cases(script: str, cases: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Each case's exit status and output, the cases one after another."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for i, (name, args) in enumerate(cases.items()):
            out, err = Path(folder) / f"{i}.out", Path(folder) / f"{i}.err"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(script, args, out, err)
            status = os.waitpid(pid, 0)[1]
            results[name] = {
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read_text() if out.exists() else "",
                "stderr": err.read_text() if err.exists() else "",
            }
    return results


def forked_runs(
    script: str, cases: dict[str, list[str]], folder: Path, env: dict[str, str]
) -> dict[str, subprocess.CompletedProcess]:
    """What ``python script *args`` gives for every case's ``args`` (run as described above;
    ``folder`` holds the cases' file)."""
    spec = folder / "cases.json"
    spec.write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, __file__, script, str(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(script).resolve().parents[1],
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        name: subprocess.CompletedProcess(
            [script, *cases[name]], r["returncode"], r["stdout"], r["stderr"]
        )
        for name, r in runs.items()
    }


def forked_runs_once(
    tmp_path_factory: Any,
    name: str,
    script: str,
    make_cases: Callable[[Path], dict[str, list[str]]],
    env: dict[str, str],
) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """``forked_runs`` once per pytest session, also under pytest-xdist
    (``shared_fixture.computed_once``): ``make_cases(folder)`` prepares a new folder of the
    session and names the cases. Returns that folder and the runs."""
    from shared_fixture import computed_once, session_folder  # pytest's, not the forking parent's

    def compute() -> dict[str, Any]:
        folder = Path(tempfile.mkdtemp(prefix=name, dir=session_folder(tmp_path_factory)))
        runs = forked_runs(script, make_cases(folder), folder, env)
        record = {k: [r.args, r.returncode, r.stdout, r.stderr] for k, r in runs.items()}
        return {"folder": str(folder), "runs": record}

    record = computed_once(tmp_path_factory, name, compute)
    runs = {k: subprocess.CompletedProcess(*r) for k, r in record["runs"].items()}
    return Path(record["folder"]), runs


if __name__ == "__main__":
    print(json.dumps(run_cases(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))))

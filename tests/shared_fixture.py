"""Expensive fixture results computed once per pytest session, also under pytest-xdist.

A module-scoped fixture runs once per xdist worker: each worker is its own process. With
``computed_once`` the first worker to need a result computes it under an ``fcntl`` lock and
writes it as JSON to a folder of this session that every worker sees; the others wait on the
lock and read that file.

The folder (``session_folder``) is the session's own and new each session, so an earlier
session's file is never read: under xdist it is the parent of the worker's base temporary
folder (the controller's ``pytest-N``, or ``--basetemp``, which pytest empties at the start of
each session); without xdist the base temporary folder itself (its parent, ``pytest-of-<user>``,
is shared between sessions). The file name also carries the xdist run id.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this pytest session that every xdist worker of the session can read."""
    basetemp = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and basetemp.name.startswith("popen-"):
        return basetemp.parent  # the controller's base temporary folder
    return basetemp


def computed_once(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """``compute()`` run once per session, by whichever worker asks first; every caller gets its
    result as read back from JSON (tuples become lists). Files ``compute`` writes for the others
    to read belong under ``session_folder(tmp_path_factory)``."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", "local")
    shared = session_folder(tmp_path_factory) / f"{name}-{run_id}.json"
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one computes
        if not shared.is_file():
            partial = shared.with_suffix(".partial")
            partial.write_text(json.dumps(compute()))
            partial.replace(shared)  # a worker that dies mid-write leaves no half file
        return json.loads(shared.read_text())

"""The layer-parallel engine (sgjax.parallel.spmd): every schedule as one SPMD program per chunk,
against independent references and across processes.

The expensive part runs once, in one test: a subprocess with 4 simulated CPU devices (this file
as a script, one JSON line) and, at the same time, 2 processes x 2 devices under
jax.distributed; tiny sizes keep the compiles short.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from forked_cases import forked_runs
from local_processes import start_processes, xla_flags

TINY = dict(hidden_layers=3, hidden_units=32, sg_hidden_units=32, batch_size=32)
# Linear label-conditioned modules; chunks of 20 ticks (the first fills, the last drains), an
# evaluation and a checkpoint every 40 minibatches: long enough for a process to be killed
# mid-run, short enough to be cheap.
SG = dict(
    mode="cdni",
    sg_hidden_layers=0,
    num_steps=120,
    eval_every=40,
    chunk_steps=20,
    learning_rate=1e-2,
    **TINY,
)
# The complete unlock (3 groups on 3 devices), with --update_prob's coins; chunks of 4.
UNLOCK = dict(
    mode="cdni",
    synthetic_inputs=True,
    update_prob=0.5,
    sg_hidden_layers=0,
    num_steps=8,
    eval_every=4,
    chunk_steps=4,
    learning_rate=1e-2,
    parallel="layers",
    **(TINY | dict(hidden_layers=2)),
)
SG_FLAGS = [f"--{name}={value}" for name, value in SG.items()]
REPO = Path(__file__).resolve().parents[1]


def quiet(_: str) -> None:
    """A log function that drops the lines."""


def _noise_only(name: str, last_stage: str) -> bool:
    """A Dense bias in front of BatchNorm, or BatchNorm's running mean (not in the last stage).

    BatchNorm subtracts the mean, so such a bias has an exactly zero gradient in exact
    arithmetic; Adam scales its rounding noise up to steps about the learning rate, which
    differ between any two compilations of the same sums (tests/test_parallel.py's
    ``bp_difference`` says the same of the dispatch engine against one device).
    """
    return not name.startswith(last_stage) and (
        name.endswith("['Dense_0']['bias']") or name.endswith("['BatchNorm_0']['mean']")
    )


def differences(a: Any, b: Any) -> dict[str, float]:
    """Largest absolute difference of two model states: everywhere, and apart from the
    pre-BatchNorm biases and running means."""
    last = f".stages[{len(a.stages) - 1}]"
    every, rest = 0.0, 0.0
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True
    ):
        d = float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0))
        every = max(every, d)
        if not _noise_only(jax.tree_util.keystr(path), last):
            rest = max(rest, d)
    return {"every": every, "rest": rest}


def _records(result) -> list[dict]:
    return [dataclasses.asdict(r) | {"elapsed_s": 0.0} for r in result.records]


def unlock_results(mnist: Any) -> dict[str, Any]:
    """The complete unlock on 3 devices against its stages grouped on one device (its
    independent reference, ``Trainer.step``, is tests/test_parallel_unlock.py's), and the run
    stopped after its first period and resumed from the checkpoint."""
    from sgjax.parallel.layers import train_layer_parallel
    from sgjax.training.checkpoint import Checkpointer
    from sgjax.training.config import TrainConfig
    from sgjax.training.loop import init_train_state

    config = TrainConfig(**UNLOCK)
    common = dict(kind="sg_pipeline", num_devices=3, log=quiet)
    ours = train_layer_parallel(config, mnist, engine="spmd", **common)
    theirs = train_layer_parallel(config, mnist, **(common | dict(num_devices=1)))
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = Checkpointer(Path(folder))
        train_layer_parallel(
            config,
            mnist,
            engine="spmd",
            stop_requested=lambda: True,
            save_checkpoint=lambda point: checkpointer.save(point, config),
            **common,
        )
        start = checkpointer.restore(config, jax.eval_shape(lambda: init_train_state(config)))
        checkpointer.close()
    resumed = train_layer_parallel(config, mnist, engine="spmd", start=start, **common)
    return {
        "placement": list(ours.stage_devices),
        "difference": differences(ours.state.model, theirs.state.model),
        "records": [
            [[r.train_loss, *r.sg_loss, *r.input_loss] for r in x.records] for x in (ours, theirs)
        ],
        "resume_step": int(start.state.step),
        "inflight": sorted(start.inflight or {}),
        "resume_difference": differences(resumed.state.model, ours.state.model)["every"],
        "resume_records_equal": _records(resumed) == _records(ours),
    }


def four_device_results() -> dict[str, Any]:
    """Everything the tests check, computed under 4 simulated devices."""
    from optax import tree_utils as otu

    from sgjax.data import load_dataset
    from sgjax.parallel import spmd
    from sgjax.parallel.layers import train_layer_parallel
    from sgjax.training.config import TrainConfig

    assert len(jax.devices()) == 4, jax.devices()
    mnist = load_dataset("mnist", None)
    out: dict[str, Any] = {}
    traces: list[int] = []
    original = spmd.PipelineEngine.compile

    def counting_compile(engine, lengths):
        original(engine, lengths)
        traces.append(engine.traces)

    spmd.PipelineEngine.compile = counting_compile

    # sg: chunks of 20 ticks (the first fills, the last drains), one program; its records are
    # what 2 processes x 2 devices must reproduce. The schedule's references (staleness, stages
    # sharing devices, resume, backprop, the decoupled modes) are tests/test_parallel.py's.
    sg = TrainConfig(**SG)
    ours = train_layer_parallel(sg, mnist, kind="sg_pipeline", num_devices=4, log=quiet)
    counts = [s.opt_state for s in (*ours.state.model.stages, *ours.state.model.synthesizers)]
    out["sg"] = {
        "placement": list(ours.stage_devices),
        "records": _records(ours),
        "update_counts": sorted(
            {int(c) for opt in counts for _, c in otu.tree_get_all_with_path(opt, "count")}
        ),
    }
    out["traces"] = traces
    out["unlock"] = unlock_results(mnist)
    return out


def run_four_devices() -> dict[str, Any]:
    """``four_device_results`` in a subprocess with 4 simulated devices."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_sg_pipeline(four_devices: dict[str, Any]) -> None:
    """The sg pipeline on 4 devices: a stage per device, every layer and module updated once
    per minibatch. (Each stage timed alone, results.json's ideal speed-up: the same schedule's
    run across 2 processes, ``check_two_processes``, which times its stages anyway.)"""
    sg = four_devices["sg"]
    assert sg["placement"] == [0, 1, 2, 3]
    assert sg["update_counts"] == [120]


def check_one_program(four_devices: dict[str, Any]) -> None:
    """Chunks of 20 ticks, 3 periods, fill and drain: the chunk program is traced once per
    engine (the evaluation is a separate program)."""
    assert set(four_devices["traces"]) == {1}, four_devices["traces"]


def check_unlock(four_devices: dict[str, Any]) -> None:
    """The complete unlock (--synthetic_inputs) on 3 devices computes what its stages grouped
    on one device compute, with the same records (input losses too); stopped and resumed,
    bitwise the uninterrupted run. (Its stages timed alone: tests/test_parallel_unlock.py's
    ``mlp_results``, the same unlocked pipeline on 3 devices.)"""
    unlock = four_devices["unlock"]
    assert unlock["placement"] == [0, 1, 2]
    assert unlock["difference"]["rest"] < 1e-5, unlock["difference"]
    ours, theirs = unlock["records"]
    assert len(ours[0]) == 1 + 2 + 2  # loss, 2 synthesizers' and 2 input models' losses
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert unlock["resume_step"] == 4
    assert {name.rsplit("_", 1)[0] for name in unlock["inflight"]} == {"below", "stored", "target"}
    assert unlock["resume_difference"] == 0.0 and unlock["resume_records_equal"], unlock


# --------------------------------------------------------------------------- two processes


def _is_step(line: str, step: int) -> bool:
    fields = line.split("|")[0].split()
    return len(fields) == 2 and fields[0] == "step" and fields[1].startswith(f"{step}/")


def run_two_processes(folder: Path) -> dict[str, Any]:
    """The sg run as 2 processes x 2 devices: process 1 killed after minibatch 40 (the first
    checkpoint; killed at 60, when checkpoint 40 is surely complete), then resumed with
    tools/launch_local.sh."""
    command = [
        sys.executable,
        str(REPO / "experiments" / "mnist_mlp.py"),
        "--distributed",
        "--distributed_timeout=5",
        "--parallel=layers",
        "--engine=spmd",
        *SG_FLAGS,
        f"--output_dir={folder}",
    ]
    devices = xla_flags(2)  # the flags of start_processes, for the same programs
    processes = start_processes(command, 2, 2)
    guard = threading.Timer(300, lambda: [p.kill() for p in processes])  # bounded, whatever
    guard.start()
    try:
        for line in processes[1].stdout:
            if _is_step(line, 60):  # so process 0 has finished checkpoint 40
                break
        processes[1].kill()
        killed = time.monotonic()
        _, stderr = processes[0].communicate(timeout=120)
        stopped_after = time.monotonic() - killed
        processes[1].communicate(timeout=30)
    finally:
        guard.cancel()
        for process in processes:
            process.kill()
    resumed = subprocess.run(
        [str(REPO / "tools" / "launch_local.sh"), "2", "env", f"XLA_FLAGS={devices}", *command]
        + ["--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = folder / "results.json"
    return {
        "killed_code": processes[0].returncode,
        "stderr": stderr,
        "stopped_after_s": stopped_after,
        "resumed": resumed,
        "results": json.loads(results.read_text()) if results.exists() else None,
    }


def check_two_processes(two_processes: dict[str, Any], four_devices: dict[str, Any]) -> None:
    """2 processes x 2 devices: a killed process stops the other with one line within the
    timeout; resumed with tools/launch_local.sh, the run ends with what 4 devices of one
    process compute, and only process 0 wrote it, with each stage timed alone (a stage per
    device, ids 0, 1 and process 1's; results.json's ideal speed-up)."""
    assert two_processes["killed_code"] == 1, two_processes["stderr"][-2000:]
    lines = [line for line in two_processes["stderr"].splitlines() if line.strip()]
    assert "Traceback" not in two_processes["stderr"]
    assert lines[-1].startswith("error: process 0 stops:"), lines[-3:]
    assert two_processes["stopped_after_s"] < 5 + 30
    resumed = two_processes["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[1] process 1: completed" in resumed.stdout
    assert "[0] resuming from step" in resumed.stdout
    results = two_processes["results"]
    assert results["status"] == "completed"
    assert results["config"]["engine"] == "spmd"
    parallel = results["parallel"]
    assert parallel["kind"] == "sg_pipeline" and len(set(parallel["stage_devices"])) == 4, parallel
    assert len(parallel["stage_ms"]) == 4 and min(parallel["stage_ms"]) > 0, parallel
    assert parallel["ideal_speedup"] > 1, parallel
    expected = four_devices["sg"]["records"]
    assert [r["step"] for r in results["history"]] == [r["step"] for r in expected]
    for got, want in zip(results["history"], expected, strict=True):
        for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), name
        np.testing.assert_allclose(got["sg_loss"], want["sg_loss"], rtol=1e-6, atol=1e-9)


def test_spmd_engine_on_four_devices_and_across_two_processes(tmp_path):
    """Everything expensive, once: 4 simulated devices in one process (against the
    single-device references) and, at the same time, the same sg run as 2 processes x
    2 devices (killed, resumed). One test, so that pytest-xdist's workers do not both pay."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        four = pool.submit(run_four_devices)
        two = pool.submit(run_two_processes, tmp_path / "run")
        four_devices, two_processes = four.result(), two.result()
    check_sg_pipeline(four_devices)
    check_one_program(four_devices)
    check_unlock(four_devices)
    check_two_processes(two_processes, four_devices)


# --------------------------------------------------------------------------- bad input


def test_distributed_placement_errors_are_one_line():
    from sgjax.cli.distributed import cluster_from
    from sgjax.training.config import ConfigError

    for args, words in [
        ((None, None, None, 5), "--coordinator_address"),
        (("host", 2, 0, 5), "host:port"),
        (("127.0.0.1:1", 2, 2, 5), "--process_id=2"),
        (("127.0.0.1:1", 0, 0, 5), "--num_processes=0"),
        (("127.0.0.1:1", 2, 0, 0), "--distributed_timeout"),
    ]:
        with pytest.raises(ConfigError, match=words) as error:
            cluster_from(*args)
        assert "\n" not in str(error.value)
    assert cluster_from("127.0.0.1:1", 2, 1, 5).process_id == 1


def test_stages_share_devices_and_bad_counts_are_refused():
    from sgjax.parallel.spmd import stage_mesh
    from sgjax.training.config import ConfigError

    assert stage_mesh(4, 0, jax.devices()[:1]).devices.size == 1  # 0: as many as there are
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count"):
        stage_mesh(4, 2, jax.devices()[:1])


def test_spmd_flags_refused_in_one_line(tmp_path):
    """Bad --engine/--distributed input: one line, exit code 2, nothing written (each case its
    own process, forked from one Python start: tests/forked_cases.py)."""
    cases = {
        "--parallel=layers only": ["--engine=spmd"],
        "--num_devices=2 must be": ["--parallel=layers", "--engine=spmd", "--num_devices=2"],
        "--process_id=3": ["--distributed", "--process_id=3", "--num_processes=2"],
    }
    runs = forked_runs(
        str(REPO / "experiments" / "mnist_mlp.py"),
        {words: [*extra, f"--output_dir={tmp_path / 'out'}"] for words, extra in cases.items()},
        tmp_path,
        dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="127.0.0.1:1"),
    )
    for words, done in runs.items():
        assert done.returncode == 2, (words, done.stderr[-2000:])
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
        assert words in done.stderr, (words, done.stderr)
    assert not (tmp_path / "out").exists()


def test_launcher_refuses_bad_arguments():
    for args in (["2"], ["0", "true"], ["x", "true"], ["2", "no-such-command-here"]):
        done = subprocess.run(
            [str(REPO / "tools" / "launch_local.sh"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        # The stopped and the resumed runs compile the programs of the uninterrupted run again:
        # read back from this cache instead (the same executables, so bitwise the same results).
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        print(json.dumps(four_device_results()))

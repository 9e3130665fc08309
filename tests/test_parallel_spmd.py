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
from local_processes import start_processes

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
BP = dict(mode="bp", num_steps=4, eval_every=2, learning_rate=1e-2, **TINY)
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


def _train_metrics(result) -> list[list[float]]:
    return [[r.train_loss, r.train_accuracy, *r.sg_loss] for r in result.records]


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
    ours = train_layer_parallel(config, mnist, engine="spmd", stage_timing_repeats=2, **common)
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
        "stage_ms": list(ours.stage_ms),
        "resume_step": int(start.state.step),
        "inflight": sorted(start.inflight or {}),
        "resume_difference": differences(resumed.state.model, ours.state.model)["every"],
        "resume_records_equal": _records(resumed) == _records(ours),
    }


def four_device_results() -> dict[str, Any]:
    """Everything the tests check, computed under 4 simulated devices."""
    from optax import tree_utils as otu
    from test_parallel import stale_module_reference  # this file runs as a script from tests/

    from sgjax.data import load_dataset, sample_batch, to_device
    from sgjax.parallel import spmd
    from sgjax.parallel.layers import train_layer_parallel
    from sgjax.parallel.schedules import accumulated_backprop_step
    from sgjax.training.checkpoint import Checkpointer
    from sgjax.training.config import TrainConfig
    from sgjax.training.loop import init_train_state
    from sgjax.training.model import trainer_for

    assert len(jax.devices()) == 4, jax.devices()
    mnist = load_dataset("mnist", None)
    out: dict[str, Any] = {}
    traces: list[int] = []
    original = spmd.PipelineEngine.compile

    def counting_compile(engine, lengths):
        original(engine, lengths)
        traces.append(engine.traces)

    spmd.PipelineEngine.compile = counting_compile

    # sg: chunks of 4 ticks at most (the first chunk fills, the last drains), one program.
    sg = TrainConfig(**SG)
    common = dict(kind="sg_pipeline", num_devices=4, log=quiet)
    ours = train_layer_parallel(sg, mnist, engine="spmd", stage_timing_repeats=2, **common)
    # The same schedule with two stages per device (messages between them stay on the device).
    theirs = train_layer_parallel(sg, mnist, **(common | dict(num_devices=2)))
    counts = [s.opt_state for s in (*ours.state.model.stages, *ours.state.model.synthesizers)]
    out["sg"] = {
        "placement": list(ours.stage_devices),
        "difference": differences(ours.state.model, theirs.state.model),
        # The independent reference: synchronous sg with synthesizers two updates old; one
        # update old must differ.
        "stale": {
            lag: differences(ours.state.model, stale_module_reference(sg, mnist, lag))["rest"]
            for lag in (1, 2)
        },
        "train_metrics": [_train_metrics(ours), _train_metrics(theirs)],
        "test_accuracy": [[r.test_accuracy for r in x.records] for x in (ours, theirs)],
        "records": _records(ours),
        "stage_ms": list(ours.stage_ms),
        "ideal_speedup": ours.ideal_speedup,
        "traces": list(traces),
        "update_counts": sorted(
            {int(c) for opt in counts for _, c in otu.tree_get_all_with_path(opt, "count")}
        ),
    }

    # Stopped after the first chunk, checkpointed with the minibatches in flight, resumed.
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = Checkpointer(Path(folder))
        stopped = train_layer_parallel(
            sg,
            mnist,
            engine="spmd",
            stop_requested=lambda: True,
            save_checkpoint=lambda point: checkpointer.save(point, sg),
            **common,
        )
        start = checkpointer.restore(sg, jax.eval_shape(lambda: init_train_state(sg)))
        checkpointer.close()
    resumed = train_layer_parallel(sg, mnist, engine="spmd", start=start, **common)
    out["sg"]["resume"] = {
        "stopped_at": stopped.steps_done,
        "inflight": sorted(start.inflight or {}),
        "difference": differences(resumed.state.model, ours.state.model)["every"],
        "records_equal": _records(resumed) == _records(ours),
    }

    # Backprop: model parallelism and GPipe against single-device backprop (accumulated over
    # the same microbatches).
    bp = TrainConfig(**BP)
    trainer = trainer_for(bp)
    initial = jax.jit(init_train_state, static_argnums=0)(bp)
    data = to_device(mnist)
    out["bp"] = {}
    for micro in (1, 2):
        step = jax.jit(lambda s, x, y, m=micro: accumulated_backprop_step(trainer, s, x, y, m))
        state, losses = initial.model, []
        for b in range(bp.num_steps):
            batch = sample_batch(jax.random.fold_in(initial.key, b), data, bp.batch_size)
            state, metrics = step(state, batch.images, batch.labels)
            losses.append(float(metrics.loss))
        kind = "bp_gpipe" if micro > 1 else "bp_model_parallel"
        run = train_layer_parallel(
            bp, mnist, kind=kind, num_devices=4, microbatches=micro, engine="spmd", log=quiet
        )
        out["bp"][kind] = {
            "difference": differences(run.state.model, state),
            "losses": [r.train_loss for r in run.records],
            "reference_losses": [
                float(np.mean(losses[i : i + bp.eval_every]))
                for i in range(0, bp.num_steps, bp.eval_every)
            ],
        }
    out["traces"] = traces

    # The decoupled modes against their single-device references (the cases test_parallel.py
    # does not run on the dispatch engine, and cdni at p = 0.5).
    from test_parallel import decoupled_mode_results

    out["decoupled_modes"] = decoupled_mode_results(mnist, "spmd", ("dgl_p", "zero_grad", "cdni_p"))
    out["unlock"] = unlock_results(mnist)
    return out


def run_four_devices() -> dict[str, Any]:
    """``four_device_results`` in a subprocess with 4 simulated devices."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_sg_pipeline(four_devices: dict[str, Any]) -> None:
    """The sg pipeline on 4 devices computes synchronous sg with synthesizers two updates old,
    and what the same schedule computes with two stages per device."""
    sg = four_devices["sg"]
    assert sg["placement"] == [0, 1, 2, 3]
    # Two compilations of the same arithmetic round differently, and 120 steps at a learning
    # rate of 1e-2 grow that; a schedule off by one update differs by more than 1e-3.
    assert sg["stale"]["2"] < 2e-4, sg["stale"]
    assert sg["stale"]["1"] > 1e-3, sg["stale"]
    assert sg["difference"]["rest"] < 2e-4, sg["difference"]
    ours, theirs = sg["train_metrics"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    # Adam turns the pre-BatchNorm biases' rounding noise into steps of about the learning
    # rate, and the running means carry them into evaluation.
    np.testing.assert_allclose(*sg["test_accuracy"], atol=6e-3)
    assert sg["update_counts"] == [120]  # every layer and module, once per minibatch
    # Each stage timed alone, so results.json has the ideal speed-up for the SPMD engine too.
    assert len(sg["stage_ms"]) == 4 and min(sg["stage_ms"]) > 0, sg["stage_ms"]
    assert sg["ideal_speedup"] > 1


def check_one_program(four_devices: dict[str, Any]) -> None:
    """Chunks of 20 ticks, 3 periods, fill and drain: the chunk program is traced once per
    engine (the evaluation is a separate program)."""
    assert set(four_devices["traces"]) == {1}, four_devices["traces"]


def check_resume(four_devices: dict[str, Any]) -> None:
    """Stopped, checkpointed, resumed: bitwise the uninterrupted run."""
    resume = four_devices["sg"]["resume"]
    assert resume["stopped_at"] == 20  # a stop request is honoured after the first chunk
    assert {name.split("_")[0] for name in resume["inflight"]} == {"fifo", "inbox", "target"}
    assert resume["difference"] == 0.0 and resume["records_equal"], resume


def check_unlock(four_devices: dict[str, Any]) -> None:
    """The complete unlock (--synthetic_inputs) on 3 devices computes what its stages grouped
    on one device compute, with the same records (input losses too); stopped and resumed,
    bitwise the uninterrupted run; stages timed."""
    unlock = four_devices["unlock"]
    assert unlock["placement"] == [0, 1, 2]
    assert unlock["difference"]["rest"] < 1e-5, unlock["difference"]
    ours, theirs = unlock["records"]
    assert len(ours[0]) == 1 + 2 + 2  # loss, 2 synthesizers' and 2 input models' losses
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert unlock["resume_step"] == 4
    assert {name.rsplit("_", 1)[0] for name in unlock["inflight"]} == {"below", "stored", "target"}
    assert unlock["resume_difference"] == 0.0 and unlock["resume_records_equal"], unlock
    assert len(unlock["stage_ms"]) == 3 and min(unlock["stage_ms"]) > 0, unlock["stage_ms"]


def check_backprop(four_devices: dict[str, Any], kind: str) -> None:
    """SPMD model-parallel and GPipe backprop equal single-device backprop (accumulated)."""
    run = four_devices["bp"][kind]
    assert run["difference"]["rest"] < 1e-5, run["difference"]
    np.testing.assert_allclose(run["losses"], run["reference_losses"], rtol=1e-5)


def check_decoupled_modes(four_devices: dict[str, Any]) -> None:
    """dgl and zero_grad equal the single-device steps, cdni at --update_prob=0.5 the
    single-device coins (tests/test_parallel.py's ``check_decoupled_modes``). Measured: at most
    7.5e-9; the pre-BatchNorm biases' rounding noise can reach about 1e-4 (a 4-stage dgl run)."""
    from test_parallel import check_decoupled_modes as check

    check(four_devices["decoupled_modes"], 5e-4)


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
    devices = "--xla_force_host_platform_device_count=2"
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
    process compute, and only process 0 wrote it."""
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
    check_resume(four_devices)
    check_decoupled_modes(four_devices)
    check_unlock(four_devices)
    for kind in ("bp_model_parallel", "bp_gpipe"):
        check_backprop(four_devices, kind)
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
    """Bad --engine/--distributed input: one line, exit code 2, nothing written."""
    for extra, words in [
        (["--engine=spmd"], "--parallel=layers only"),
        (["--parallel=layers", "--engine=spmd", "--num_devices=2"], "--num_devices=2 must be"),
        (["--distributed", "--process_id=3", "--num_processes=2"], "--process_id=3"),
    ]:
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "experiments" / "mnist_mlp.py"),
                *extra,
                f"--output_dir={tmp_path / 'out'}",
            ],
            env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS="127.0.0.1:1"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, (extra, done.stderr[-2000:])
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

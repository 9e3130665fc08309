"""Runs that survive: SIGKILL then --resume, SIGINT, divergence, refused output folders.

The signal cases run the real command line in a subprocess on the CPU (cdni, linear
synthesizers); bp and sg with BatchNorm in the synthesizers resume in process, through the same
checkpointer and state template as the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from forked_cases import forked_runs_once

from sgjax.data.sources import load_dataset
from sgjax.training.checkpoint import Checkpointer
from sgjax.training.config import TrainConfig
from sgjax.training.loop import Resume, init_train_state, train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "mnist_mlp.py")
# Long enough (60 chunks) that a signal sent after the 17th progress line lands mid-run (the
# signalled runs write unbuffered: a line is seen when it is printed); small enough to take
# seconds. Chunks of 10 steps in evaluation periods of 40: most chunk boundaries fall between
# evaluations.
RUN = dict(
    mode="cdni",
    num_steps=600,
    eval_every=40,
    chunk_steps=10,
    hidden_units=64,
    learning_rate=1e-3,
)
ENV = os.environ | {"JAX_PLATFORMS": "cpu"}


def _args(output_dir: Path, **overrides) -> list[str]:
    flags = RUN | overrides
    return [sys.executable, SCRIPT, f"--output_dir={output_dir}"] + [
        f"--{k}={v}" for k, v in flags.items()
    ]


def _run(args: list[str], extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        args + list(extra), capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO
    )


def _start_and_signal(args: list[str], log_dir: Path, sig: int, after_lines: int):
    """Start a run, send ``sig`` once it printed ``after_lines`` progress lines, wait for it."""
    stdout_path = log_dir / "stdout.txt"
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            args,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV | {"PYTHONUNBUFFERED": "1"},  # each progress line reaches the file at once
            cwd=REPO,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if stdout_path.read_text().count("\nstep ") >= after_lines:
                break
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be signalled"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=240)
    return process.returncode, stdout_path.read_text(), stderr


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def _comparable(results: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in results["history"]]


def _final_state(output_dir: Path):
    config = TrainConfig(**RUN)
    checkpointer = Checkpointer(output_dir / "checkpoints")
    try:
        restored = checkpointer.restore(config, jax.eval_shape(lambda: init_train_state(config)))
    finally:
        checkpointer.close()
    return restored


SHORT = dict(num_steps=40, eval_every=20)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_args(output_dir))
    assert done.returncode == 0, done.stderr
    return output_dir


def _assert_same_run(a: Path, b: Path) -> None:
    assert _results(a)["status"] == _results(b)["status"] == "completed"
    assert _comparable(_results(a)) == _comparable(_results(b))
    state_a, state_b = _final_state(a).state, _final_state(b).state
    assert int(state_a.step) == int(state_b.step) == RUN["num_steps"]
    for x, y in zip(
        jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    code, _, _ = _start_and_signal(_args(tmp_path / "run"), tmp_path, signal.SIGKILL, 17)
    tmp_path = tmp_path / "run"
    assert code == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists() or _results(tmp_path)["status"] != "completed"

    resumed = _run(_args(tmp_path), ("--resume",))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    _assert_same_run(uninterrupted, tmp_path)


def test_sigint_checkpoints_and_the_resumed_run_completes(uninterrupted, tmp_path):
    code, _, stderr = _start_and_signal(_args(tmp_path / "run"), tmp_path, signal.SIGINT, 13)
    tmp_path = tmp_path / "run"
    assert code == 130, stderr
    results = _results(tmp_path)
    assert results["status"] == "interrupted"
    assert 0 < results["steps_done"] < RUN["num_steps"]
    assert "--resume" in stderr.strip().splitlines()[-1]
    restored = _final_state(tmp_path)
    assert restored.state.step == results["steps_done"]
    print(f"stopped at step {results['steps_done']}, {restored.period.steps} steps into a period")

    resumed = _run(_args(tmp_path), ("--resume",))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, tmp_path)


def test_sigterm_exits_143_with_status_interrupted(tmp_path):
    code, _, stderr = _start_and_signal(_args(tmp_path / "run"), tmp_path, signal.SIGTERM, 6)
    tmp_path = tmp_path / "run"
    assert code == 143, stderr
    assert _results(tmp_path)["status"] == "interrupted"


def test_a_diverging_run_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path):
    done = _run(_args(tmp_path, learning_rate=1e8, eval_every=1, chunk_steps=1, num_steps=50))
    assert done.returncode == 3, done.stderr
    results = _results(tmp_path)
    assert results["status"] == "diverged"
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"by step {results['steps_done']}" in error_lines[0]

    config = TrainConfig(
        **(RUN | dict(learning_rate=1e8, eval_every=1, chunk_steps=1, num_steps=50))
    )
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    restored = checkpointer.restore(config, jax.eval_shape(lambda: init_train_state(config)))
    checkpointer.close()
    assert int(restored.state.step) < results["steps_done"]
    leaves = jax.tree_util.tree_leaves(restored.state.model)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


@pytest.fixture(scope="module")
def on_the_short_run(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """A finished short run (folder ``short``), then runs on copies of its folder (its output
    folder is free to change on --resume: ``TrainConfig.RESUME_FREE``), forked from one Python
    start (tests/forked_cases.py), one after another: without --resume or --overwrite and with
    another width on --resume (folder ``refused``), --resume on a corrupted checkpoint
    (``corrupt``), and --overwrite with another width (``replaced``). Once per session, also
    under pytest-xdist (``shared_fixture.computed_once``). Returns the root and the runs."""

    def make_cases(root: Path) -> dict[str, list[str]]:
        done = _run(_args(root / "short", **SHORT))
        assert done.returncode == 0, done.stderr
        for name in ("refused", "corrupt", "replaced"):
            shutil.copytree(root / "short", root / name)
        for path in (root / "corrupt" / "checkpoints" / "40" / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"garbage")
        flags = lambda name, **extra: _args(root / name, **SHORT, **extra)[2:]  # noqa: E731
        return {
            "refused": flags("refused"),
            "mismatched": [*flags("refused", hidden_units=32), "--resume"],
            "corrupt": [*flags("corrupt"), "--resume"],
            "replaced": [*flags("replaced", hidden_units=32), "--overwrite"],
        }

    return forked_runs_once(tmp_path_factory, "resume_refusals", SCRIPT, make_cases, ENV)


def test_an_earlier_run_is_refused_without_resume_or_overwrite(on_the_short_run):
    root, runs = on_the_short_run
    before = (root / "short" / "results.json").read_text()

    refused = runs["refused"]
    assert refused.returncode == 2
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr

    mismatched = runs["mismatched"]
    assert mismatched.returncode == 2
    assert "--hidden_units=64 (now 32)" in mismatched.stderr
    assert "Traceback" not in mismatched.stderr
    assert (root / "refused" / "results.json").read_text() == before  # neither run wrote

    replaced = runs["replaced"]
    assert replaced.returncode == 0, replaced.stderr
    assert _results(root / "replaced")["config"]["hidden_units"] == 32


def test_a_corrupt_checkpoint_is_refused_with_a_message(on_the_short_run):
    root, runs = on_the_short_run
    refused = runs["corrupt"]
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert str(root / "corrupt" / "checkpoints" / "40") in refused.stderr


@pytest.mark.parametrize("mode", ["bp", "sg"])
def test_stop_checkpoint_restore_resume_is_bitwise_the_uninterrupted_run(mode: str, tmp_path):
    """Stop mid-period, restore from disk into a fresh template, finish: the same run exactly.

    sg uses one hidden synthesizer layer, so the synthesizers' BatchNorm statistics and every
    optimizer state must survive the checkpoint too.
    """
    config = TrainConfig(
        mode=mode,
        num_steps=40,
        eval_every=20,
        chunk_steps=5,
        batch_size=32,
        hidden_layers=2,
        hidden_units=16,
        sg_hidden_layers=1,
        sg_hidden_units=16,
        learning_rate=1e-3,
    )
    dataset = load_dataset("mnist", None)
    quiet = dict(log=lambda _: None)
    whole = train_and_evaluate(config, dataset, **quiet)

    checkpointer = Checkpointer(tmp_path / "checkpoints")
    chunks = iter(range(1000))
    stopped = train_and_evaluate(
        config,
        dataset,
        save_checkpoint=lambda point: checkpointer.save(point, config),
        stop_requested=lambda: next(chunks) == 2,  # after step 15: mid-period
        **quiet,
    )
    checkpointer.close()
    assert stopped.status == "interrupted" and stopped.steps_done == 15

    checkpointer = Checkpointer(tmp_path / "checkpoints")
    template = jax.eval_shape(lambda: init_train_state(config))
    start: Resume = checkpointer.restore(config, template)
    checkpointer.close()
    assert int(start.state.step) == 15 and start.period.steps == 15
    if mode == "sg":
        batch_stats = [s.collections["batch_stats"] for s in start.state.model.synthesizers]
        assert len(batch_stats) == 2 and len(jax.tree_util.tree_leaves(batch_stats)) == 4
    resumed = train_and_evaluate(config, dataset, start=start, **quiet)

    assert resumed.status == whole.status == "completed"
    strip = lambda records: [r.__dict__ | {"elapsed_s": 0} for r in records]  # noqa: E731
    assert strip(resumed.records) == strip(whole.records)
    chex.assert_trees_all_equal(resumed.state, whole.state)


def test_the_riskiest_decoupling_modes_stop_and_resume_bitwise(tmp_path):
    """Issue 12's modes keep state beyond the stages: the per-example stale gradient's table, the
    complete unlock's synthetic-input models, and --update_prob's coins (drawn from the step's
    key). Stopped mid-period, restored from disk and finished, each run is the uninterrupted one
    exactly, records (the input models' losses included) and state."""
    base = TrainConfig(
        num_steps=20,
        eval_every=10,
        chunk_steps=5,
        batch_size=16,
        hidden_layers=2,
        hidden_units=16,
        sg_hidden_layers=0,
        sg_hidden_units=16,
        learning_rate=1e-3,
        update_prob=0.5,
    )
    dataset = load_dataset("mnist", None)
    quiet = dict(log=lambda _: None)
    for name, extra in {
        "stale": dict(mode="stale_grad_example"),
        "unlock": dict(mode="cdni", synthetic_inputs=True),
    }.items():
        # (The command line sizes the stale gradient's table from the data before it restores.)
        config = dataclasses.replace(base, **extra).with_train_examples(dataset.train_size)
        whole = train_and_evaluate(config, dataset, **quiet)
        checkpointer = Checkpointer(tmp_path / name)
        chunks = iter(range(1000))
        stopped = train_and_evaluate(
            config,
            dataset,
            save_checkpoint=lambda point, c=checkpointer, cfg=config: c.save(point, cfg),
            stop_requested=lambda it=chunks: next(it) == 2,  # after step 15: mid-period
            **quiet,
        )
        checkpointer.close()
        assert stopped.status == "interrupted" and stopped.steps_done == 15

        checkpointer = Checkpointer(tmp_path / name)
        start = checkpointer.restore(config, jax.eval_shape(lambda c=config: init_train_state(c)))
        checkpointer.close()
        model = start.state.model
        if name == "stale":  # the averages are in the checkpoint, and not still zero
            assert all(np.abs(s.collections["stale"]).max() > 0 for s in model.synthesizers)
        else:  # the input models are, and they moved from their initialisation
            assert len(model.inputs) == 2
            initial = [m.params for m in init_train_state(config).model.inputs]
            params = [m.params for m in model.inputs]
            moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), params, initial)
            assert all(jax.tree_util.tree_leaves(moved))
        resumed = train_and_evaluate(config, dataset, start=start, **quiet)

        strip = lambda records: [r.__dict__ | {"elapsed_s": 0} for r in records]  # noqa: E731
        assert resumed.status == whole.status == "completed"
        assert strip(resumed.records) == strip(whole.records)
        chex.assert_trees_all_equal(resumed.state, whole.state)
        losses = [r.input_loss for r in whole.records]
        if name == "unlock":  # per boundary, finite, and learning
            assert all(len(x) == 2 and np.all(np.isfinite(x)) for x in losses)
            assert all(b < a for a, b in zip(losses[0], losses[1], strict=True)), losses
        else:
            assert losses == [(), ()]

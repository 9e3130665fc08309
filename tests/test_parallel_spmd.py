"""The SPMD engine (sgjax.parallel.spmd): the dispatch engine's schedules as one program.

Everything runs once, in a subprocess with 4 simulated CPU devices (this file as a script, one
JSON line), and the tests below check its numbers; tiny sizes keep the compiles short.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

TINY = dict(hidden_layers=3, hidden_units=32, sg_hidden_units=32, batch_size=32)
SG = dict(mode="cdni", sg_hidden_layers=1, num_steps=12, eval_every=4, learning_rate=1e-2, **TINY)
BP = dict(mode="bp", num_steps=4, eval_every=2, learning_rate=1e-2, **TINY)


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


def four_device_results() -> dict[str, Any]:
    """Everything the tests check, computed under 4 simulated devices."""
    from optax import tree_utils as otu

    from sgjax.data import load_dataset, sample_batch, to_device
    from sgjax.parallel import spmd
    from sgjax.parallel.bp_pipeline import accumulated_backprop_step
    from sgjax.parallel.layers import train_layer_parallel
    from sgjax.training.checkpoint import Checkpointer
    from sgjax.training.config import TrainConfig
    from sgjax.training.loop import init_train_state
    from sgjax.training.model import trainer_for

    assert len(jax.devices()) == 4, jax.devices()
    mnist = load_dataset("mnist", None)
    out: dict[str, Any] = {}
    traces: list[int] = []
    original = spmd.SpmdEngine.compile

    def counting_compile(engine, lengths):
        original(engine, lengths)
        traces.append(engine.traces)

    spmd.SpmdEngine.compile = counting_compile

    # sg: chunks of 4 ticks at most (the first chunk fills, the last drains), one program.
    sg = TrainConfig(chunk_steps=4, **SG)
    common = dict(kind="sg_pipeline", num_devices=4, log=quiet)
    ours = train_layer_parallel(sg, mnist, engine="spmd", **common)
    theirs = train_layer_parallel(sg, mnist, **common)
    counts = [s.opt_state for s in (*ours.state.model.stages, *ours.state.model.synthesizers)]
    out["sg"] = {
        "placement": list(ours.stage_devices),
        "difference": differences(ours.state.model, theirs.state.model),
        "train_metrics": [_train_metrics(ours), _train_metrics(theirs)],
        "test_accuracy": [[r.test_accuracy for r in x.records] for x in (ours, theirs)],
        "traces": list(traces),
        "update_counts": sorted(
            {int(c) for opt in counts for _, c in otu.tree_get_all_with_path(opt, "count")}
        ),
    }

    # Stopped after the first period, checkpointed with the minibatches in flight, resumed by
    # the SPMD engine (from its own checkpoint) and by the dispatch engine (from the same one).
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
    crossed = train_layer_parallel(sg, mnist, start=start, **common)
    out["sg"]["resume"] = {
        "stopped_at": stopped.steps_done,
        "inflight": sorted(start.inflight or {}),
        "difference": differences(resumed.state.model, ours.state.model)["every"],
        "records_equal": _records(resumed) == _records(ours),
        "dispatch_from_spmd": differences(crossed.state.model, theirs.state.model),
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
    return out


@pytest.fixture(scope="module")
def four_devices() -> dict[str, Any]:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_spmd_sg_pipeline_equals_the_dispatch_pipeline(four_devices):
    sg = four_devices["sg"]
    assert sg["placement"] == [0, 1, 2, 3]
    assert sg["difference"]["rest"] < 1e-5, sg["difference"]
    ours, theirs = sg["train_metrics"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    # The pre-BatchNorm biases differ by rounding noise only: the test split barely notices.
    np.testing.assert_allclose(*sg["test_accuracy"], atol=2e-3)
    assert sg["update_counts"] == [12]  # every layer and module, once per minibatch


def test_one_program_for_every_chunk(four_devices):
    """Chunks of 4 ticks, 3 periods, fill and drain: the chunk program is traced once per
    engine (the evaluation is a separate program)."""
    assert set(four_devices["traces"]) == {1}, four_devices["traces"]


def test_spmd_resumes_exactly_and_shares_checkpoints_with_dispatch(four_devices):
    resume = four_devices["sg"]["resume"]
    assert resume["stopped_at"] == 4
    assert {name.split("_")[0] for name in resume["inflight"]} == {"fifo", "inbox", "target"}
    assert resume["difference"] == 0.0 and resume["records_equal"], resume
    assert resume["dispatch_from_spmd"]["rest"] < 1e-5, resume


@pytest.mark.parametrize("kind", ["bp_model_parallel", "bp_gpipe"])
def test_spmd_backprop_equals_single_device_backprop(four_devices, kind):
    run = four_devices["bp"][kind]
    assert run["difference"]["rest"] < 1e-5, run["difference"]
    np.testing.assert_allclose(run["losses"], run["reference_losses"], rtol=1e-5)


if __name__ == "__main__":
    print(json.dumps(four_device_results()))

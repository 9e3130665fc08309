"""CPU seconds of each part of tests/test_parallel.py's four-device fixture (the suite's largest).

Run with 4 simulated devices, from the repository root::

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      PYTHONPATH=$PWD python tools/profile_four_devices.py

Each line: a part of ``four_device_results`` and the process's CPU time (all threads) and wall
time it took. Without ``JAX_COMPILATION_CACHE_DIR`` every program compiles, also the ones the
test session's cache would load (the resumed runs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import test_parallel as tp  # noqa: E402

from sgjax.data import load_dataset  # noqa: E402
from sgjax.parallel.layers import train_layer_parallel  # noqa: E402
from sgjax.training.config import TrainConfig  # noqa: E402
from sgjax.training.loop import init_train_state  # noqa: E402

_last = [time.process_time(), time.time()]


def lap(name: str) -> None:
    cpu, wall = time.process_time(), time.time()
    print(f"{name}: cpu {cpu - _last[0]:.1f} s wall {wall - _last[1]:.1f} s", flush=True)
    _last[:] = [cpu, wall]


def main() -> None:
    mnist, quiet = load_dataset("mnist", None), tp.quiet
    sg = TrainConfig(
        mode="cdni", sg_hidden_layers=1, num_steps=12, eval_every=4, learning_rate=1e-2, **tp.TINY
    )
    for n in (4, 2, 1):
        train_layer_parallel(sg, mnist, kind="sg_pipeline", num_devices=n, log=quiet)
    lap("sg runs on 4, 2, 1 devices")
    for lag in (0, 1, 2):
        tp.stale_module_reference(sg, mnist, lag)
    lap("stale references (lags 0, 1, 2)")
    with tempfile.TemporaryDirectory() as folder:
        tp.resumed_run(sg, mnist, Path(folder), "sg_pipeline")
    lap("sg stopped and resumed")
    bp = TrainConfig(mode="bp", num_steps=6, eval_every=3, learning_rate=1e-2, **tp.TINY)
    tp._reference_bp(bp, mnist, 1)
    tp._reference_bp(bp, mnist, 4)
    lap("bp references (1 and 4 microbatches)")
    train_layer_parallel(bp, mnist, kind="bp_model_parallel", num_devices=4, log=quiet)
    train_layer_parallel(bp, mnist, kind="bp_gpipe", num_devices=4, microbatches=4, log=quiet)
    lap("bp model-parallel and GPipe")
    with tempfile.TemporaryDirectory() as folder:
        tp.resumed_run(bp, mnist, Path(folder), "bp_gpipe", 4)
    lap("GPipe stopped and resumed")
    tp.chain_results(mnist)
    lap("LayerNorm chain (cdni, GPipe)")
    tp.decoupled_mode_results(mnist, "dispatch", ("dgl", "zero_grad_p", "cdni_p"), still=True)
    lap("decoupled modes (dgl, zero_grad_p, cdni_p, cdni at p = 0)")
    floor = TrainConfig(mode="sg", seed=0, **tp.FLOOR_CONFIG)
    run = train_layer_parallel(floor, mnist, kind="sg_pipeline", num_devices=4, log=quiet)
    lap(f"floor run (accuracy {[round(r.test_accuracy, 3) for r in run.records]})")
    tp.synthetic_gradient_cosines(floor, run.state.model, mnist)
    initial = jax.jit(init_train_state, static_argnums=0)(floor).model
    tp.synthetic_gradient_cosines(floor, initial, mnist)
    lap("floor cosines")


if __name__ == "__main__":
    main()

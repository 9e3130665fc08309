"""Speed of the layer-parallel engine against the scanned single-device loop.

Usage (4 simulated CPU devices; the flag must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tools/spmd_speed.py \
        [--steps=600] [--repeats=2] [--sg_hidden_units=256] [--batch_size=256]

For sg (pipeline), bp (model parallelism) and bp with GPipe (4 microbatches) on the paper's MLP
(3 x 256) it trains ``--steps`` minibatches with each engine, ``--repeats`` times interleaved,
and prints minibatches (= ticks in steady state) per second, examples per second (training time
only: compilation and evaluation excluded, as results.json counts it), the ratio pipelined /
single device, and the ideal speed-up over one device from each stage's time alone
(``stage_ms``). One JSON line at the end holds every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax

from sgjax.data import load_dataset
from sgjax.parallel.layers import train_layer_parallel
from sgjax.training.config import TrainConfig
from sgjax.training.loop import train_and_evaluate


def quiet(_: str) -> None:
    """Drop the log lines."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--sg_hidden_units", type=int, default=256)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1 or args.sg_hidden_units < 1:
        print(
            "error: --steps, --repeats, --batch_size and --sg_hidden_units must be positive",
            file=sys.stderr,
        )
        return 2
    if jax.device_count() < 4:
        print(
            "error: needs 4 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=4",
            file=sys.stderr,
        )
        return 2
    mnist = load_dataset("mnist", None)
    common = dict(
        num_steps=args.steps,
        eval_every=args.steps,
        chunk_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=1e-3,
        sg_hidden_layers=1,
        sg_hidden_units=args.sg_hidden_units,
        checkpoint_every=0,
    )
    cases = {
        "sg": ("sg", "sg_pipeline", 1),
        "bp_model_parallel": ("bp", "bp_model_parallel", 1),
        "bp_gpipe_4": ("bp", "bp_gpipe", 4),
    }
    out: dict = {"steps": args.steps, "batch_size": args.batch_size, "cases": {}}
    for name, (mode, kind, micro) in cases.items():
        config = TrainConfig(mode=mode, **common)
        rates: dict[str, list[float]] = {"scanned": [], "pipelined": []}
        stage_ms: tuple[float, ...] = ()
        for _ in range(args.repeats):
            start = time.perf_counter()
            run = train_and_evaluate(config, mnist, log=quiet)
            rates["scanned"].append(run.steps_done / run.train_time_s)
            run = train_layer_parallel(
                config,
                mnist,
                kind=kind,
                num_devices=4,
                microbatches=micro,
                log=quiet,
                stage_timing_repeats=0 if stage_ms else 20,
            )
            if run.stage_ms:
                stage_ms, ideal = run.stage_ms, run.ideal_speedup
            rates["pipelined"].append(run.steps_done / run.train_time_s)
            print(f"{name}: one repeat in {time.perf_counter() - start:.0f} s", flush=True)
        medians = {k: statistics.median(v) for k, v in rates.items()}
        out["cases"][name] = {
            "minibatches_per_s": medians,
            "examples_per_s": {k: v * args.batch_size for k, v in medians.items()},
            "all": rates,
            "pipelined_over_scanned": medians["pipelined"] / medians["scanned"],
            "stage_ms": list(stage_ms),
            "ideal_speedup": ideal,
        }
        print(
            f"{name}: minibatches/s scanned {medians['scanned']:.1f}, pipelined "
            f"{medians['pipelined']:.1f} ({medians['pipelined'] / medians['scanned']:.2f}x); "
            "stage ms "
            f"{' / '.join(f'{t:.2f}' for t in stage_ms)}, ideal speed-up {ideal:.2f}x",
            flush=True,
        )
    out["machine"] = {
        "platform": platform.platform(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

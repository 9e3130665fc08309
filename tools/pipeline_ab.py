"""Milliseconds per minibatch of the layer-parallel engine, for an A/B of two source trees.

Usage (run once per tree, alternating, e.g. ``PYTHONPATH=/old/tree`` then ``PYTHONPATH=$PWD``):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=<tree> \
        python tools/pipeline_ab.py [--steps=300] [--chunk=50] [--cases=sg,bp,gpipe]

Trains the paper's MLP (3 x 256, batch 256; sg modules 1 x 256) with ``train_layer_parallel``
(``engine="spmd"``, 4 devices) and times every training chunk but the first (``advance``:
compilation and evaluation excluded), as wall and process CPU time. Prints one JSON line:
per case, the median ms per minibatch over the chunks, wall and CPU. Works with any tree whose
engine class (``PipelineEngine`` or the older ``SpmdEngine``) has ``advance(steps)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from sgjax.data import load_dataset
from sgjax.parallel import spmd
from sgjax.parallel.layers import train_layer_parallel
from sgjax.training.config import TrainConfig

CASES = {
    "sg": (dict(mode="sg", sg_hidden_layers=1, sg_hidden_units=256), "sg_pipeline", 1),
    "bp": (dict(mode="bp"), "bp_model_parallel", 1),
    "gpipe": (dict(mode="bp"), "bp_gpipe", 4),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--cases", default="sg,bp,gpipe")
    args = parser.parse_args()
    if jax.device_count() < 4:
        print("error: set XLA_FLAGS=--xla_force_host_platform_device_count=4", file=sys.stderr)
        return 2
    engine_type = getattr(spmd, "PipelineEngine", None) or spmd.SpmdEngine
    timings: list[tuple[int, float, float]] = []
    advance = engine_type.advance

    def timed(self, steps: int):
        wall, cpu = time.perf_counter(), time.process_time()
        out = advance(self, steps)
        timings.append((steps, time.perf_counter() - wall, time.process_time() - cpu))
        return out

    engine_type.advance = timed
    mnist = load_dataset("mnist", None)
    out = {}
    for name in args.cases.split(","):
        extra, kind, micro = CASES[name]
        config = TrainConfig(
            num_steps=args.steps, eval_every=args.chunk, chunk_steps=args.chunk, **extra
        )
        timings.clear()
        train_layer_parallel(
            config, mnist, kind=kind, num_devices=4, microbatches=micro,
            log=lambda _: None, engine="spmd",
        )  # fmt: skip
        steady = timings[1:]
        out[name] = {
            "wall_ms": statistics.median(1e3 * w / s for s, w, _ in steady),
            "cpu_ms": statistics.median(1e3 * c / s for s, _, c in steady),
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

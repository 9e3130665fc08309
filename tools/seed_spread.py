"""The spread over seeds of the feed-forward learning tests' runs, from which their floors and
margins are set (BUILD_NOTES.md, "Learning floors across seeds"). Seeds vmapped, one program per
run (the CNN's seed by seed, as its test trains them); the tests' own configurations. Run from
the repository root with the suite's flags:

  XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false" \\
      python tools/seed_spread.py train --seeds=8   # or cnn, decoupling

The layer-parallel tests' runs (tests/test_parallel.py's sg_pipeline floor, tests/
test_parallel_unlock.py's pipelined and synchronous complete unlock) go one seed after another
on 4 simulated devices: add --xla_force_host_platform_device_count=4 to XLA_FLAGS and choose
pipeline or unlock.

Prints one line per run (final test accuracy per seed, the top boundary's cosine with the true
gradient) and, last, all of it as JSON (with every record's accuracy and every boundary's
cosine)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sgjax.training.loop as loop  # noqa: E402
from sgjax.data import load_dataset, scale_images, to_device  # noqa: E402
from sgjax.parallel.layers import train_layer_parallel  # noqa: E402
from sgjax.training.config import TrainConfig  # noqa: E402
from sgjax.training.model import trainer_for  # noqa: E402

Runs = dict[str, Callable[[jax.Array, object], tuple[jax.Array, jax.Array]]]
WITH_CONTROL = {"bp": ("bp", False), "sg": ("sg", False), "cdni": ("cdni", False)} | {
    "frozen": ("sg", True)  # hidden layers that never learn: sg's and cdni's control
}
"""Run name: (mode, frozen)."""


def train_runs(mnist) -> Runs:
    """tests/test_train.py: the 300-step MLP floor runs and the frozen-hidden-layer control."""
    from test_train import FLOOR_CONFIG

    images = scale_images(mnist.train_images[:512])
    labels = jnp.asarray(mnist.train_labels[:512])

    def run(mode: str, frozen: bool) -> Callable:
        config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
        trainer = trainer_for(config)
        used = trainer.frozen_control() if frozen else trainer

        def whole(seeds: jax.Array, data: object) -> tuple[jax.Array, jax.Array]:
            original, loop.trainer_for = loop.trainer_for, lambda _: used  # traced here, once
            try:
                train = jax.vmap(loop.make_train(config), in_axes=(0, None, None))
                state, history = train(seeds, jnp.float32(config.learning_rate), data)
            finally:
                loop.trainer_for = original
            cosines = jnp.zeros((len(seeds), 0))
            if config.decoupled:
                cosine = lambda m: trainer.synthetic_gradient_cosines(m, images, labels)  # noqa: E731
                cosines = jax.vmap(cosine)(state.model)
            return history.test_accuracy[:, -1], cosines

        return whole

    return {name: run(*how) for name, how in WITH_CONTROL.items()}


def cnn_runs(mnist) -> Runs:
    """tests/test_cnn.py: the tiny CNN's 300-step runs and the frozen-hidden-layer control, each
    seed trained as the test trains it (``test_cnn.train``)."""
    from test_cnn import train

    def run(mode: str, frozen: bool) -> Callable:
        def each(seeds: jax.Array, _) -> tuple[jax.Array, jax.Array]:
            outcomes = [train(mode, seed, frozen) for seed in seeds.tolist()]
            cosines = [o.cosines for o in outcomes]
            return jnp.asarray([o.accuracy for o in outcomes]), jnp.asarray(cosines)

        return each

    return {name: run(*how) for name, how in WITH_CONTROL.items()}


def decoupling_runs(mnist) -> Runs:
    """tests/test_decoupling_runs.py: every method's short run and the zero-gradient control."""
    from test_decoupling_runs import FLOOR_CONFIG, RUNS

    def run(name: str, extra: dict) -> Callable:
        config = dataclasses.replace(FLOOR_CONFIG, mode=name.removesuffix("_unlock"), **extra)

        def whole(seeds: jax.Array, data) -> tuple[jax.Array, jax.Array]:
            train = jax.vmap(loop.make_train(config), in_axes=(0, None, None))
            history = train(seeds, jnp.float32(config.learning_rate), data)[1]
            return history.test_accuracy[:, -1], jnp.zeros((len(seeds), 0))

        return whole

    return {name: run(name, extra) for name, extra in RUNS.items()}


def pipeline_runs(mnist) -> Runs:
    """tests/test_parallel.py: the 4-device sg pipeline's 300-step floor run."""
    from test_parallel import FLOOR_CONFIG, quiet, synthetic_gradient_cosines

    def whole(seeds: jax.Array, _) -> tuple[jax.Array, jax.Array]:
        accuracy, cosines = [], []
        for seed in seeds.tolist():
            config = TrainConfig(mode="sg", seed=seed, **FLOOR_CONFIG)
            run = train_layer_parallel(config, mnist, kind="sg_pipeline", num_devices=4, log=quiet)
            accuracy.append([r.test_accuracy for r in run.records])
            cosines.append(synthetic_gradient_cosines(config, run.state.model, mnist))
        return jnp.asarray(accuracy), jnp.asarray(cosines)

    return {"sg_pipeline": whole}


def unlock_runs(mnist) -> Runs:
    """tests/test_parallel_unlock.py: the complete unlock's short run, pipelined on 4 devices
    and synchronous."""
    from test_parallel import quiet
    from test_parallel_unlock import FLOOR

    def run(pipelined: bool) -> Callable:
        def whole(seeds: jax.Array, _) -> tuple[jax.Array, jax.Array]:
            accuracy = []
            for seed in seeds.tolist():
                config = TrainConfig(mode="sg", synthetic_inputs=True, seed=seed, **FLOOR)
                if pipelined:
                    config = dataclasses.replace(config, parallel="layers")
                    kind = dict(kind="sg_pipeline", num_devices=4)
                    records = train_layer_parallel(config, mnist, **kind, log=quiet).records
                else:
                    records = loop.train_and_evaluate(config, mnist, log=quiet).records
                accuracy.append([r.test_accuracy for r in records])
            return jnp.asarray(accuracy), jnp.zeros((len(seeds), 0))

        return whole

    return {"pipelined": run(True), "synchronous": run(False)}


TESTS = {"train": train_runs, "decoupling": decoupling_runs}
LOOPED = {"cnn": cnn_runs, "pipeline": pipeline_runs, "unlock": unlock_runs}  # seed by seed
FOUR_DEVICES = {"pipeline", "unlock"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test", choices=sorted(TESTS | LOOPED))
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0 to N-1")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be at least 1")
    mnist = load_dataset("mnist", None)
    if args.test in FOUR_DEVICES and len(jax.devices()) != 4:
        parser.error(f"{args.test} needs 4 devices; XLA_FLAGS gave {len(jax.devices())}")
    data, seeds, spread = to_device(mnist), jnp.arange(args.seeds), {}
    for name, run in (TESTS | LOOPED)[args.test](mnist).items():
        start = time.perf_counter()
        call = run if args.test in LOOPED else jax.jit(run)
        accuracy, cosines = (np.asarray(a, np.float64) for a in call(seeds, data))
        records = accuracy.round(4).tolist() if accuracy.ndim == 2 else None
        accuracy = accuracy[:, -1] if accuracy.ndim == 2 else accuracy
        top = cosines[:, -1].round(3).tolist() if cosines.size else []
        spread[name] = {"accuracy": accuracy.round(4).tolist(), "top_cosine": top}
        if records is not None:
            spread[name]["records"] = records
        if cosines.size:
            spread[name]["cosines"] = cosines.round(4).tolist()
        seconds = time.perf_counter() - start
        print(f"{name} ({seconds:.0f} s): accuracy {spread[name]['accuracy']}, top cosine {top}")
    print(json.dumps(spread))


if __name__ == "__main__":
    main()

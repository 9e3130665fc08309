"""Check the benchmark's pro-rated time to accuracy against timestamps taken inside the program.

  python tools/tta_timestamps.py [--modes=bp,sg] [--num_steps=300] [--eval_every=50]

The benchmark runs the whole training (evaluations included) as one compiled, vmapped program,
so it measures only the total and pro-rates it by steps: the time at step k is
``run_s * k / num_steps``. Here the same program (``make_run_chunk`` periods with
``evaluate_state`` after each, seeds vmapped, the quick preset's network) also calls the host
(``jax.debug.callback``) after each training period and after each evaluation, so the time
every evaluation point was actually reached, and each evaluation's own time, are measured. The
table prints, per mode, the largest gap between measured and pro-rated times (as a share of the
run) and the evaluations' share of the run (what "evaluations included" adds).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from sgjax.bench.names import markdown_row, markdown_table
from sgjax.cli.errors import make_flags_parser
from sgjax.data import load_dataset, to_device
from sgjax.training.config import TrainConfig
from sgjax.training.loop import evaluate_state, init_train_state, make_run_chunk

flags.DEFINE_list("modes", ["bp", "sg", "cdni"], "Modes to time.")
flags.DEFINE_integer("num_steps", 300, "Steps (a multiple of --eval_every).", lower_bound=1)
flags.DEFINE_integer("eval_every", 50, "Steps per period.", lower_bound=1)
flags.DEFINE_integer("num_seeds", 2, "Seeds vmapped in one program.", lower_bound=1)
FLAGS = flags.FLAGS
STAMPS: list[tuple[str, int, float]] = []  # (after "train" or "eval", step, host time)


def stamp(kind: str):
    def record(step: np.ndarray, _: np.ndarray) -> None:
        STAMPS.append((kind, int(np.ravel(step)[0]), time.perf_counter()))

    return record


def timed_train(config: TrainConfig, train_examples: int):
    periods = config.num_steps // config.eval_every
    sized = config.with_train_examples(train_examples)
    run = make_run_chunk(sized, config.eval_every)

    def train(seed: jax.Array, data) -> jax.Array:
        def period(state, _):
            state, metrics = run(state, data)
            jax.debug.callback(stamp("train"), state.step, metrics.loss)
            _, accuracy = evaluate_state(sized, state, data)
            jax.debug.callback(stamp("eval"), state.step, accuracy)
            return state, accuracy

        return jax.lax.scan(period, init_train_state(sized, seed), None, length=periods)[1]

    return train


def main(argv: list[str]) -> int:
    del argv
    if FLAGS.num_steps % FLAGS.eval_every:
        raise app.UsageError("--num_steps must be a multiple of --eval_every")
    data = to_device(load_dataset("mnist", None))
    print(
        "\n".join(
            markdown_table(
                [
                    "mode",
                    "run s",
                    "measured s at each evaluation",
                    "largest |measured - pro-rated| / run",
                    "evaluations / run",
                ]
            )
        )
    )
    for mode in FLAGS.modes:
        config = TrainConfig(
            mode=mode,
            num_steps=FLAGS.num_steps,
            eval_every=FLAGS.eval_every,
            batch_size=256,
            hidden_layers=3,
            hidden_units=256,
            learning_rate=1e-3,
            sg_hidden_layers=1,
            sg_hidden_units=256,
        ).validate()
        seeds = np.arange(FLAGS.num_seeds, dtype=np.uint32)
        train = jax.vmap(timed_train(config, data.train_images.shape[0]), in_axes=(0, None))
        compiled = jax.jit(train).lower(seeds, data).compile()
        jax.block_until_ready(compiled(seeds, data))  # warm-up
        STAMPS.clear()
        start = time.perf_counter()
        jax.block_until_ready(compiled(seeds, data))
        run_s = time.perf_counter() - start
        first = {}  # (kind, step) -> the first seed's call (vmap calls once per seed)
        for kind, step, at in STAMPS:
            first.setdefault((kind, step), at - start)
        steps = np.arange(1, FLAGS.num_steps // FLAGS.eval_every + 1) * FLAGS.eval_every
        measured = np.array([first["eval", s] for s in steps])
        gap = np.max(np.abs(measured - run_s * steps / FLAGS.num_steps)) / run_s
        evals = sum(first["eval", s] - first["train", s] for s in steps) / run_s
        at = " ".join(f"{t:.1f}" for t in measured)
        print(markdown_row([mode, f"{run_s:.2f}", at, f"{gap:.3f}", f"{evals:.3f}"]), flush=True)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=make_flags_parser(FLAGS))

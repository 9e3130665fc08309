"""Time one recurrent update of each mode (bptt, dni, dni_aux) per truncation, FLOPs beside.

  python tools/rnn_step_time.py                       # the paper's size: LSTM 256, batch 256
  python tools/rnn_step_time.py --hidden_units=32 --batch_size=16 --truncations=2,3

Each timing is the median over --repeats of a compiled lax.scan of --steps updates of
``RecurrentTrainer.step`` on Copy-shaped inputs (8-bit patterns); the modes alternate inside
every repeat so that they share the machine's state. Compile time is reported apart. Prints a
markdown table with each mode's time and FLOPs relative to bptt of the same truncation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from sgjax.bench.names import device_label, markdown_row, markdown_table
from sgjax.bench.programs import compiled_flops
from sgjax.core.recurrent import RECURRENT_MODES, Segment
from sgjax.models.lstm import zero_carry
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.programs import make_trainer
from sgjax.tasks.copy import CopyTask, sigmoid_loss


def _update(mode: str, truncation: int, args: argparse.Namespace, unroll: int | bool = 1):
    """One update of ``mode`` on a fixed Copy-shaped segment, and its starting point."""
    config = RNNConfig(
        task="copy", mode=mode, truncation=truncation, hidden_units=args.hidden_units,
        batch_size=args.batch_size, learning_rate=1e-4,
    )  # fmt: skip
    task = CopyTask("copy", 256)
    trainer = make_trainer(config, task.output_dim, sigmoid_loss, unroll)
    shape = (truncation, args.batch_size)
    inputs = jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (*shape, task.input_dim))
    targets = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (*shape, task.output_dim))
    segment = Segment(
        inputs.astype(jnp.float32), targets.astype(jnp.float32), jnp.ones(shape, jnp.float32)
    )
    carry = zero_carry(args.batch_size, args.hidden_units)
    continues = jnp.ones((args.batch_size,))
    state = trainer.init(jax.random.PRNGKey(0), carry, segment.inputs[0])

    def one(state_and_carry, _=None):
        state, carry = state_and_carry
        state, carry, metrics = trainer.step(state, carry, segment, continues)
        return (state, carry), metrics.loss_sum

    return one, (state, carry)


def _timed_program(mode: str, truncation: int, args: argparse.Namespace):
    """``args.steps`` updates in one compiled scan, its start, and its compile time."""
    one, start = _update(mode, truncation, args)
    begin = time.perf_counter()
    compiled = (
        jax.jit(lambda s: jax.lax.scan(one, s, None, length=args.steps)).lower(start).compile()
    )
    return compiled, start, time.perf_counter() - begin


def _flops(mode: str, truncation: int, args: argparse.Namespace) -> float:
    """XLA's count for one update after optimisation, with the segment's steps unrolled (a
    loop's body is counted once)."""
    one, start = _update(mode, truncation, args, unroll=True)
    return compiled_flops(jax.jit(one).lower(start).compile())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_units", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--truncations", default="2,3,4,5")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        truncations = [int(t) for t in args.truncations.split(",")]
        if (
            min(truncations) <= 0
            or min(args.hidden_units, args.batch_size, args.steps, args.repeats) <= 0
        ):
            raise ValueError
    except ValueError:
        print(
            "error: --truncations (comma-separated), --hidden_units, --batch_size, --steps "
            "and --repeats must be positive integers",
            file=sys.stderr,
        )
        return 2
    print(
        f"device: {device_label()}; LSTM {args.hidden_units}, batch "
        f"{args.batch_size}; median of {args.repeats} x {args.steps} updates\n"
    )
    headers = ["T", "mode", "ms/update", "vs bptt", "GFLOP/update", "vs bptt", "compile s"]
    print(*markdown_table(headers), sep="\n")
    for truncation in truncations:
        programs = {m: _timed_program(m, truncation, args) for m in RECURRENT_MODES}
        flops = {m: _flops(m, truncation, args) for m in RECURRENT_MODES}
        times: dict[str, list[float]] = {m: [] for m in RECURRENT_MODES}
        for _ in range(args.repeats):
            for mode, (compiled, start, _) in programs.items():
                begin = time.perf_counter()
                jax.block_until_ready(compiled(start))
                times[mode].append((time.perf_counter() - begin) * 1e3 / args.steps)
        base_ms = statistics.median(times["bptt"])
        for mode, (_, _, compile_s) in programs.items():
            ms = statistics.median(times[mode])
            ratio = flops[mode] / flops["bptt"]
            cells = [truncation, mode, f"{ms:.3f}", f"{ms / base_ms:.2f}x"]
            cells += [f"{flops[mode] / 1e9:.3f}", f"{ratio:.2f}x", f"{compile_s:.1f}"]
            print(markdown_row(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

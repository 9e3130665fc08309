"""Step timing and arithmetic counts: scanned loop vs. a jitted step driven from Python.

Both variants run the identical step on identical device-resident data; only the loop differs.
Compile time is measured apart (ahead-of-time ``lower().compile()``), runs are warmed up first
and every timing ends with ``block_until_ready``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from sgjax.config import TrainConfig
from sgjax.data import DeviceData, sample_batch
from sgjax.schedules import make_optimizer
from sgjax.steps import make_train_step
from sgjax.train import TrainState, init_train_state, make_run_chunk, schedule_for


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    """Median milliseconds per step over ``repeats`` timed runs, and the compile time."""

    ms_per_step: float
    compile_s: float
    steps: int
    repeats: int


def _make_single_step(config: TrainConfig):
    def single_step(state: TrainState, data: DeviceData) -> TrainState:
        step_fn = make_train_step(config, make_optimizer(schedule_for(config, state.learning_rate)))
        batch = sample_batch(jax.random.fold_in(state.key, state.step), data, config.batch_size)
        model, _ = step_fn(state.model, batch.images, batch.labels)
        return state._replace(model=model, step=state.step + 1)

    return single_step


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def time_scanned(
    config: TrainConfig, data: DeviceData, steps: int = 200, repeats: int = 3
) -> LoopTiming:
    """``steps`` train steps inside one ``lax.scan``."""
    state = init_train_state(config)
    start = time.perf_counter()
    chunk = jax.jit(make_run_chunk(config, steps)).lower(state, data).compile()
    compile_s = time.perf_counter() - start
    state, _ = chunk(state, data)  # warm-up
    jax.block_until_ready(state)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = chunk(state, data)
        jax.block_until_ready(state)
        runs.append(time.perf_counter() - start)
    return LoopTiming(1e3 * _median(runs) / steps, compile_s, steps, repeats)


def time_python_loop(
    config: TrainConfig, data: DeviceData, steps: int = 200, repeats: int = 3
) -> LoopTiming:
    """The same step, jitted alone and called ``steps`` times from a Python loop."""
    state = init_train_state(config)
    start = time.perf_counter()
    step = jax.jit(_make_single_step(config)).lower(state, data).compile()
    compile_s = time.perf_counter() - start
    for _ in range(5):  # warm-up
        state = step(state, data)
    jax.block_until_ready(state)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state = step(state, data)
        jax.block_until_ready(state)
        runs.append(time.perf_counter() - start)
    return LoopTiming(1e3 * _median(runs) / steps, compile_s, steps, repeats)


def flops_per_step(config: TrainConfig, data: DeviceData) -> float:
    """XLA's FLOP count for one compiled train step (batch sampling included)."""
    state = init_train_state(config)
    compiled = jax.jit(_make_single_step(config)).lower(state, data).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matrix-product rate of the default device, in GFLOP/s."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    jax.block_until_ready(product(a))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        runs.append(time.perf_counter() - start)
    return 2 * size**3 / _median(runs) / 1e9

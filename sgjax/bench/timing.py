"""Step timing and arithmetic counts: the identical step on identical device-resident data, in a
``lax.scan`` or called from a Python loop (or fed from the host, as unoptimised code does).
Compile time is measured apart, runs are warmed up and every timing ends with a block."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.device import DeviceData, sample_batch
from sgjax.data.sources import Dataset
from sgjax.training.config import TrainConfig
from sgjax.training.loop import TrainState, evaluate_state, init_train_state, make_run_chunk
from sgjax.training.model import trainer_for


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    """Median milliseconds per step over ``repeats`` timed runs, the compile time, and XLA's
    FLOP count of one step of the timed program (XLA counts a loop body once)."""

    ms_per_step: float
    compile_s: float
    steps: int
    repeats: int
    flops_per_step: float = float("nan")


def _make_single_step(config: TrainConfig):
    step_fn = trainer_for(config).step

    def single_step(state: TrainState, data: DeviceData) -> tuple[TrainState]:
        batch = sample_batch(jax.random.fold_in(state.key, state.step), data, config.batch_size)
        model, _ = step_fn(state.model, batch.images, batch.labels, example_ids=batch.indices)
        return (state._replace(model=model, step=state.step + 1),)

    return single_step


def compile_timed(fn: Callable, *args: Any) -> tuple[jax.stages.Compiled, float]:
    """``jax.jit(fn)`` compiled ahead of time for ``args``, and the seconds that took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _timed(
    fn: Callable, state: Any, inputs: Callable[[], tuple], steps: int, repeats: int, calls: int
) -> LoopTiming:
    """Compile ``fn(state, *inputs()) -> (state, ...)`` and time ``calls`` calls of it that
    carry the state (``steps`` train steps in all; median of ``repeats`` after a warm-up)."""
    compiled, compile_s = compile_timed(fn, state, *inputs())

    def run() -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(calls):
            state = compiled(state, *inputs())[0]
        jax.block_until_ready(state)
        return time.perf_counter() - start

    run()  # warm-up
    seconds = statistics.median_high([run() for _ in range(repeats)])
    return LoopTiming(1e3 * seconds / steps, compile_s, steps, repeats, compiled_flops(compiled))


def time_scanned(
    config: TrainConfig, data: DeviceData, steps: int = 200, repeats: int = 3
) -> LoopTiming:
    config = config.with_train_examples(data.train_images.shape[0])
    chunk = make_run_chunk(config, steps)
    return _timed(chunk, init_train_state(config), lambda: (data,), steps, repeats, 1)


def time_python_loop(
    config: TrainConfig, data: DeviceData, steps: int = 200, repeats: int = 3
) -> LoopTiming:
    """The same step, jitted alone and called ``steps`` times from a Python loop."""
    config = config.with_train_examples(data.train_images.shape[0])
    step = _make_single_step(config)
    return _timed(step, init_train_state(config), lambda: (data,), steps, repeats, steps)


def time_host_fed_loop(
    config: TrainConfig, dataset: Dataset, steps: int = 200, repeats: int = 3
) -> LoopTiming:
    """The common unoptimised pattern: each step's batch drawn, gathered and scaled with numpy,
    copied to the device, and the jitted step called from Python (what keeping the data on the
    device and sampling inside the compiled loop saves)."""
    config = config.with_train_examples(dataset.train_size)
    trainer = trainer_for(config)
    rng = np.random.default_rng(config.seed)

    def host_batch() -> tuple[jax.Array, jax.Array, jax.Array]:
        index = rng.integers(0, dataset.train_size, config.batch_size)
        images = dataset.train_images[index].astype(np.float32) / 255.0
        return tuple(jax.device_put(a) for a in (images, dataset.train_labels[index], index))

    def step(model: Any, x: jax.Array, labels: jax.Array, ids: jax.Array) -> Any:
        return trainer.step(model, x, labels, example_ids=ids)

    model = init_train_state(config).model
    return _timed(step, model, host_batch, steps, repeats, steps)


def compiled_flops(compiled: jax.stages.Compiled) -> float:
    """XLA's FLOP count of a compiled program (a loop body is counted once); NaN if unknown."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
    """XLA's estimate of a compiled program's memory: arguments, outputs and temporaries."""
    try:
        s = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if s is None:
        return None
    return int(
        s.argument_size_in_bytes
        + s.output_size_in_bytes
        + s.temp_size_in_bytes
        - s.alias_size_in_bytes
    )


def flops_per_step(config: TrainConfig, data: DeviceData) -> float:
    """XLA's FLOP count for one compiled train step (batch sampling included)."""
    config = config.with_train_examples(data.train_images.shape[0])
    return compiled_flops(
        compile_timed(_make_single_step(config), init_train_state(config), data)[0]
    )


def flops_per_evaluation(config: TrainConfig, data: DeviceData) -> float:
    """XLA's FLOP count for one evaluation on the whole test split."""
    config = config.with_train_examples(data.train_images.shape[0])
    evaluate = functools.partial(evaluate_state, config)
    return compiled_flops(compile_timed(evaluate, init_train_state(config), data)[0])


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's devices so far (max over them); None where the
    backend keeps no statistics (the CPU)."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The default device's float32 matrix-product rate in GFLOP/s: the best of ``repeats``
    timed products, i.e. what the device reaches when nothing else competes for it."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    runs = []
    for _ in range(repeats + 1):  # the first call compiles
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        runs.append(time.perf_counter() - start)
    return 2 * size**3 / min(runs[1:]) / 1e9

"""Benchmark execution: each ``sweep.ProgramSpec`` as one ``jax.jit(jax.vmap(...))`` program
sharded over every device, and step timing (compile apart, warmed up, blocked)."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgjax.bench.sweep import (
    BENCHMARK_MODES,
    Override,
    ProgramSpec,
    SweepAxis,
    benchmark_mode,
    plan_programs,
    sweep_label,
)
from sgjax.data.device import DeviceData, sample_batch, to_device
from sgjax.data.sources import Dataset
from sgjax.training.config import MAX_SEED, PAPER_MODES, ConfigError, TrainConfig
from sgjax.training.loop import (
    RunHistory,
    TrainState,
    evaluate_state,
    init_train_state,
    make_run_chunk,
    make_train,
)
from sgjax.training.model import trainer_for

RUN_AXIS = "runs"
MAX_NUM_SEEDS = 1024  # a program's seeds are vmapped together; more is a typo, not a benchmark


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    """Median ms per step of ``repeats`` runs, compile time, XLA's FLOPs of one step."""

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
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _timed(
    fn: Callable, state: Any, inputs: Callable[[], tuple], steps: int, repeats: int, calls: int
) -> LoopTiming:
    """Compile ``fn(state, *inputs())`` and time ``calls`` calls (median after a warm-up)."""
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
    return _timed(
        make_run_chunk(config, steps), init_train_state(config), lambda: (data,), steps, repeats, 1
    )


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
    """The unoptimised pattern: numpy batches copied to the device every step."""
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
    try:
        s = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if s is None:
        return None
    return int(s.argument_size_in_bytes + s.output_size_in_bytes + s.temp_size_in_bytes) - int(
        s.alias_size_in_bytes
    )


def flops_per_step(config: TrainConfig, data: DeviceData) -> float:
    config = config.with_train_examples(data.train_images.shape[0])
    return compiled_flops(
        compile_timed(_make_single_step(config), init_train_state(config), data)[0]
    )


def flops_per_evaluation(config: TrainConfig, data: DeviceData) -> float:
    config = config.with_train_examples(data.train_images.shape[0])
    evaluate = functools.partial(evaluate_state, config)
    return compiled_flops(compile_timed(evaluate, init_train_state(config), data)[0])


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's devices; None without statistics (CPU)."""
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [int(s["peak_bytes_in_use"]) for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The default device's float32 matmul rate in GFLOP/s (best of ``repeats``)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    runs = []
    for _ in range(repeats + 1):  # the first call compiles
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        runs.append(time.perf_counter() - start)
    return 2 * size**3 / min(runs[1:]) / 1e9


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    base: TrainConfig
    modes: tuple[str, ...] = PAPER_MODES
    num_seeds: int = 1
    sweeps: tuple[SweepAxis, ...] = ()
    loop_steps: int = 0  # steps per timing of lax.scan vs. a Python loop (0: skip it)
    loop_repeats: int = 3
    compare_separate: bool = True  # with several runs per program, also run each alone
    preset: str | None = None
    overrides: tuple[Override, ...] = ()  # the preset's per-task values
    tta_fractions: tuple[float, ...] = (0.9, 0.99)  # time to these fractions of bp's accuracy

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.base.seed, self.base.seed + self.num_seeds))

    def validate(self) -> BenchmarkSettings:
        choices = ",".join(BENCHMARK_MODES)
        if not self.modes:
            raise ConfigError(f"--modes is empty; choose from {choices}")
        for mode in self.modes:
            if mode not in BENCHMARK_MODES:
                raise ConfigError(f"unknown mode {mode!r} in --modes; choose from {choices}")
        if len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"--modes={','.join(self.modes)} names a mode twice")
        if not 1 <= self.num_seeds <= MAX_NUM_SEEDS:
            raise ConfigError(f"--num_seeds={self.num_seeds} must be between 1 and {MAX_NUM_SEEDS}")
        last_seed = self.base.seed + self.num_seeds - 1
        if last_seed > MAX_SEED:
            raise ConfigError(
                f"--seed={self.base.seed} with --num_seeds={self.num_seeds} reaches seed "
                f"{last_seed}, above {MAX_SEED}; lower --seed or --num_seeds"
            )
        if self.loop_steps < 0 or self.loop_repeats < 1:
            raise ConfigError("--loop_steps must be >= 0 and --loop_repeats >= 1")
        self.programs()  # validates every swept configuration
        return self

    def programs(self) -> list[ProgramSpec]:
        return plan_programs(self.base, self.modes, self.sweeps, self.seeds, self.overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "modes": list(self.modes),
            "num_seeds": self.num_seeds,
            "seeds": list(self.seeds),
            "sweeps": [axis.describe() for axis in self.sweeps],
            "overrides": [override.describe() for override in self.overrides],
            "loop_steps": self.loop_steps,
            "loop_repeats": self.loop_repeats,
            "compare_separate": self.compare_separate,
            "tta_fractions": list(self.tta_fractions),
            "base_config": self.base.to_dict(),
        }


@dataclasses.dataclass(frozen=True)
class SeparateRuns:
    """The runs of a program, each compiled alone (one compile) and run one after another."""

    compile_s: float
    run_s: tuple[float, ...]
    history: RunHistory  # numpy, leading run axis

    @property
    def total_run_s(self) -> float:
        return float(sum(self.run_s))


class Difference(NamedTuple):
    value: float
    metric: str

    def format(self) -> str:
        return f"{self.value:.1e} ({self.metric})"


@dataclasses.dataclass(frozen=True)
class ProgramResult:
    spec: ProgramSpec
    history: RunHistory  # numpy, (runs, evaluations[, layers])
    compile_s: float
    run_s: float
    step_flops: float
    eval_flops: float
    num_devices: int
    peak_memory_bytes: int | None
    program_memory_bytes: int | None
    separate: SeparateRuns | None = None

    @property
    def num_evals(self) -> int:
        return int(self.history.step.shape[1])

    @property
    def total_flops(self) -> float:
        per_run = self.spec.config.num_steps * self.step_flops + self.num_evals * self.eval_flops
        return self.spec.num_runs * per_run

    @property
    def achieved_gflops(self) -> float:
        return self.total_flops / self.run_s / 1e9

    @property
    def ms_per_step(self) -> float:
        """Program wall time per step (all of its runs advance one step)."""
        return 1e3 * self.run_s / self.spec.config.num_steps

    @property
    def single_run_ms_per_step(self) -> float | None:
        if self.separate is None:
            return None
        return 1e3 * float(np.median(self.separate.run_s)) / self.spec.config.num_steps

    def separate_difference(self) -> Difference | None:
        """Largest |vmapped - separate| over every metric and evaluation, and where."""
        if self.separate is None:
            return None
        return max(
            Difference(float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0)), name)
            for name, a, b in zip(
                RunHistory._fields, self.history, self.separate.history, strict=True
            )
        )


@dataclasses.dataclass(frozen=True)
class LoopComparison:
    mode: str
    config: TrainConfig
    scanned: LoopTiming
    python_loop: LoopTiming

    @property
    def ratio(self) -> float:
        """Python-loop time over scanned time (> 1: compiling the loop pays)."""
        return self.python_loop.ms_per_step / self.scanned.ms_per_step


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    settings: BenchmarkSettings
    programs: list[ProgramResult]
    loops: list[LoopComparison]
    matmul_gflops: float
    datasets: Mapping[str, Dataset]
    status: str = "completed"  # or "interrupted" (between programs) or "diverged"
    message: str = ""


# ---------------------------------------------------------------------------------- sharding


def run_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (RUN_AXIS,))


def _place(values: Any, mesh: Mesh, *spec: str) -> jax.Array:
    host, sharding = np.asarray(values), NamedSharding(mesh, PartitionSpec(*spec))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_runs(values: np.ndarray, mesh: Mesh) -> jax.Array:
    """``values`` split over ``mesh`` by run, padded by repeating the last run."""
    padded_size = -(-len(values) // mesh.size) * mesh.size
    padded = np.concatenate([values, np.repeat(values[-1:], padded_size - len(values), axis=0)])
    return _place(padded, mesh, RUN_AXIS)


# ---------------------------------------------------------------------------------- programs


class Execution(NamedTuple):
    """One program run: every run's outputs (numpy, leading run axis) and the cost."""

    history: Any
    compile_s: float
    run_s: float
    num_devices: int
    program_memory_bytes: int | None
    peak_memory_bytes: int | None


def run_vmapped(
    fn: Callable[..., Any],
    args: Sequence[Any],
    in_axes: Sequence[int | None],
    mesh: Mesh | None = None,
    keep: Callable[[Any], Any] = lambda outputs: outputs,
) -> Execution:
    """``jax.jit(jax.vmap(fn, in_axes))(*args)``, runs sharded over ``mesh``, timed apart; an
    argument on axis 0 is an array or a pytree of arrays with a leading run axis."""
    mesh = mesh or run_mesh()
    by_run = next(a for a, axis in zip(args, in_axes, strict=True) if axis == 0)
    num_runs = len(jax.tree_util.tree_leaves(by_run)[0])
    by_run_or_whole = {
        0: lambda x: shard_runs(np.asarray(x), mesh),
        None: lambda x: _place(x, mesh),
    }
    placed = [
        jax.tree_util.tree_map(by_run_or_whole[axis], a)
        for a, axis in zip(args, in_axes, strict=True)
    ]
    compiled, compile_s = compile_timed(jax.vmap(fn, in_axes=tuple(in_axes)), *placed)
    start = time.perf_counter()
    outputs = jax.block_until_ready(keep(compiled(*placed)))
    run_s = time.perf_counter() - start
    if jax.process_count() > 1:  # numpy copies of the multi-host sharded arrays
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
    outputs = jax.tree_util.tree_map(lambda x: np.asarray(x)[:num_runs], jax.device_get(outputs))
    memory = compiled_memory_bytes(compiled)
    return Execution(outputs, compile_s, run_s, mesh.size, memory, peak_memory_bytes())


def train_runs(
    config: TrainConfig,
    seeds: np.ndarray,
    learning_rates: np.ndarray,
    data: DeviceData,
    mesh: Mesh | None = None,
) -> Execution:
    """One run per (seed, learning rate) in one program sharded over ``mesh``."""
    args = (np.asarray(seeds, np.uint32), np.asarray(learning_rates, np.float32), data)
    return run_vmapped(make_train(config), args, (0, 0, None), mesh, keep=lambda out: out[1])


def run_separately(spec: ProgramSpec, data: DeviceData) -> SeparateRuns:
    """Each run of ``spec`` alone: ``jax.jit(make_train(config))`` compiled once, run per run."""
    seeds, learning_rates = spec.run_seeds(), spec.run_learning_rates()
    compiled, compile_s = compile_timed(make_train(spec.config), seeds[0], learning_rates[0], data)
    histories, times = [], []
    for seed, lr in zip(seeds, learning_rates, strict=True):
        start = time.perf_counter()
        _, history = compiled(jnp.asarray(seed), jnp.asarray(lr), data)
        histories.append(jax.device_get(history))
        times.append(time.perf_counter() - start)
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *histories)
    return SeparateRuns(compile_s, tuple(times), stacked)


def run_program(
    spec: ProgramSpec,
    data: DeviceData,
    mesh: Mesh | None = None,
    separate: bool = False,
    step_flops: float | None = None,
) -> ProgramResult:
    """Compile, run and count ``spec``; optionally rerun every run alone."""
    execution = train_runs(spec.config, spec.run_seeds(), spec.run_learning_rates(), data, mesh)
    if jax.process_index() != 0:  # only process 0 writes (--distributed): skip the counting
        step_flops = eval_flops = float("nan")
    else:
        eval_flops = flops_per_evaluation(spec.config, data)
        if step_flops is None:
            step_flops = flops_per_step(spec.config, data)
    separate_runs = run_separately(spec, data) if separate else None
    counts = dict(step_flops=step_flops, eval_flops=eval_flops, separate=separate_runs)
    return ProgramResult(spec, **execution._asdict(), **counts)


def run_benchmark(
    settings: BenchmarkSettings,
    datasets: Mapping[str, Dataset],
    log: Callable[[str], None] = print,
    *,
    done: Mapping[int, ProgramResult] | None = None,
    on_program: Callable[[int, ProgramResult], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    divergence: Callable[[ProgramResult], str] = lambda _: "",
) -> BenchmarkResult:
    """Every program but those ``done``; stop on ``stop_requested()`` or a divergence."""
    done = done or {}
    status, message = "completed", ""
    mesh = run_mesh()
    device_data = {name: to_device(ds) for name, ds in datasets.items()}
    rate = matmul_gflops() if jax.process_index() == 0 else float("nan")  # only 0 writes it
    log(f"float32 matmul rate of {jax.devices()[0].device_kind}: {rate:.0f} GFLOP/s")
    programs: list[ProgramResult] = []
    loops: list[LoopComparison] = []
    for index, spec in enumerate(settings.programs()):
        config, data = spec.config, device_data[spec.config.dataset]
        name = benchmark_mode(config)
        if index in done:
            programs.append(done[index])
            log(f"{name}{sweep_label(spec.static)}: done in an earlier session, not run again")
            continue
        loop = next((t for t in loops if t.config == config), None)
        if settings.loop_steps and all(t.mode != name for t in loops):
            steps, repeats = settings.loop_steps, settings.loop_repeats
            timings = (f(config, data, steps, repeats) for f in (time_scanned, time_python_loop))
            loop = LoopComparison(name, config, *timings)
            loops.append(loop)
            estimate_s = loop.scanned.ms_per_step * config.num_steps * spec.num_runs / 1e3
            log(
                f"{name}: lax.scan {loop.scanned.ms_per_step:.2f} ms/step, Python loop "
                f"{loop.python_loop.ms_per_step:.2f} ms/step (loop/scan {loop.ratio:.2f}); "
                f"expect roughly {estimate_s:.0f} s for {spec.num_runs} run(s) of "
                f"{config.num_steps} steps"
            )
        log(
            f"{name}{sweep_label(spec.static)}: compiling and running {spec.num_runs} run(s) "
            f"of {config.num_steps} steps in one program on {mesh.size} device(s)"
        )
        separate = settings.compare_separate and spec.num_runs > 1
        step_flops = loop.python_loop.flops_per_step if loop is not None else None
        result = run_program(spec, data, mesh, separate, step_flops)
        programs.append(result)
        accuracy = result.history.test_accuracy[:, -1]
        log(
            f"  compile {result.compile_s:.1f} s, run {result.run_s:.1f} s "
            f"({result.ms_per_step:.2f} ms/step, {result.achieved_gflops:.1f} GFLOP/s), "
            f"test accuracy {np.mean(accuracy):.4f} +- {np.std(accuracy):.4f}"
        )
        if result.separate is not None:
            log(
                f"  {spec.num_runs} separate runs: {result.separate.total_run_s:.1f} s; "
                f"vmapped / separate = {result.run_s / result.separate.total_run_s:.2f}; "
                f"largest difference {result.separate_difference().format()}"
            )
        if on_program is not None:
            on_program(index, result)
        message = divergence(result)
        if message:
            status = "diverged"
            break
        if stop_requested() and index + 1 < len(settings.programs()):
            status, message = "interrupted", f"stopped after {index + 1} program(s)"
            break
    return BenchmarkResult(settings, programs, loops, rate, datasets, status, message)

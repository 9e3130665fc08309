"""Layer-parallel benchmark: examples/s, accuracy and per-stage times of bp and sg schedules on
1, 2, 4... devices, with the ideal speed-up the stage times allow beside the measured one. Every
run trains on the same minibatches from the same initial state, so test accuracies compare at an
equal number of examples; compile time is excluded from examples/s."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax

from sgjax.bench.names import Reached, markdown_table, reached_columns
from sgjax.bench.sweep import benchmark_mode
from sgjax.data.sources import Dataset
from sgjax.parallel.layers import ParallelRunResult, train_layer_parallel
from sgjax.training.config import TrainConfig
from sgjax.training.loop import RunResult, train_and_evaluate


@dataclasses.dataclass(frozen=True)
class ParallelBenchmarkSettings:
    sg: TrainConfig  # the synthetic-gradient runs (a decoupled mode)
    bp: TrainConfig  # the backprop runs (mode bp), same network and steps
    device_counts: tuple[int, ...] = (1, 2, 4)
    microbatches: int = 4  # GPipe's microbatches per minibatch
    timing_repeats: int = 20  # calls per stage when timing each stage alone
    tta_fractions: tuple[float, ...] = (0.9, 0.99)  # of the single-device bp run's accuracy


@dataclasses.dataclass(frozen=True)
class BenchmarkRow:
    variant: str
    algorithm: str  # the benchmark mode: bp, sg, cdni, ...
    schedule: str  # ``single`` (the scanned single-device loop) or a ``layers.KINDS`` entry
    devices: int
    stage_devices: tuple[int, ...]
    examples: int
    examples_per_s: float
    test_accuracy: float
    compile_s: float
    evaluations: tuple[tuple[int, float, float], ...] = ()  # (step, seconds, test accuracy)
    status: str = "completed"  # otherwise no result: left out of the speed-ups and the table
    message: str = ""
    stage_ms: tuple[float, ...] = ()
    ideal_speedup: float = math.nan
    measured_speedup: float = math.nan  # examples/s over the same schedule's on one device
    vs_single: float = math.nan  # examples/s over the same algorithm's scanned loop
    time_to_accuracy: tuple[Reached, ...] = ()  # per fraction, from the records' elapsed_s

    def to_dict(self) -> dict:
        reached = [r.to_dict() for r in self.time_to_accuracy]
        return {**dataclasses.asdict(self), "time_to_accuracy": reached}


@dataclasses.dataclass(frozen=True)
class ParallelBenchmark:
    """The rows and the status: "completed", "diverged" (by one run) or "interrupted"."""

    rows: list[BenchmarkRow]
    status: str
    message: str = ""


def _row(variant: str, schedule: str, config: TrainConfig, result: RunResult) -> BenchmarkRow:
    examples = result.steps_done * config.batch_size
    parallel = isinstance(result, ParallelRunResult)
    return BenchmarkRow(
        variant=variant, algorithm=benchmark_mode(config), schedule=schedule,
        devices=result.num_devices if parallel else 1,
        stage_devices=result.stage_devices if parallel else (), examples=examples,
        examples_per_s=examples / result.train_time_s if result.train_time_s > 0 else math.nan,
        test_accuracy=result.records[-1].test_accuracy if result.records else math.nan,
        compile_s=result.compile_time_s,
        evaluations=tuple((r.step, r.elapsed_s, r.test_accuracy) for r in result.records),
        stage_ms=result.stage_ms if parallel else (),
        ideal_speedup=result.ideal_speedup if parallel else math.nan, status=result.status,
        message=result.message,
    )  # fmt: skip


def _interrupted_row(variant: str, schedule: str, config: TrainConfig) -> BenchmarkRow:
    """A run stopped before it trained (Ctrl-C while compiling)."""
    nan, message = math.nan, f"{variant}: interrupted before training"
    mode = benchmark_mode(config)
    return BenchmarkRow(
        variant, mode, schedule, 0, (), 0, nan, nan, nan, (), "interrupted", message
    )


class _Plan(NamedTuple):
    variant: str
    kind: str
    """``single`` or a ``sgjax.parallel.layers.KINDS`` entry."""
    config: TrainConfig
    microbatches: int = 1
    devices: int = 1


def run_parallel_benchmark(
    settings: ParallelBenchmarkSettings,
    dataset: Dataset,
    log: Callable[[str], None] = print,
    stop_requested: Callable[[], bool] = lambda: False,
) -> ParallelBenchmark:
    """Train every variant once (bp and sg single, then model-parallel, GPipe and the sg pipeline
    by device count), speed-ups filled in. ``stop_requested()`` stops the run in progress after
    its period and starts no further run; Ctrl-C (also while compiling) does so at once."""
    counts = sorted({n for n in settings.device_counts if n <= len(jax.local_devices())})
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    sg, bp, micro = settings.sg, settings.bp, settings.microbatches
    name = benchmark_mode(sg)
    plans = [
        _Plan("bp single device (scanned)", "single", bp),
        _Plan(f"{name} single device (scanned)", "single", sg),
        *(_Plan("bp model-parallel", "bp_model_parallel", bp, 1, n) for n in counts),
        *(_Plan(f"bp GPipe M={micro}", "bp_gpipe", bp, micro, n) for n in counts),
        *(_Plan(f"{name} layer-parallel pipeline", "sg_pipeline", sg, 1, n) for n in counts),
    ]
    rows: list[BenchmarkRow] = []
    for variant, kind, config, microbatches, devices in plans:
        if stop_requested():
            message = f"stopped before {variant} on {devices} device(s)"
            return ParallelBenchmark(
                _with_speedups(rows, settings.tta_fractions), "interrupted", message
            )
        try:
            log(f"{variant} on {devices} device(s) ...")
            if kind == "single":
                result = train_and_evaluate(
                    config, dataset, log=quiet, stop_requested=stop_requested
                )
            else:
                result = train_layer_parallel(
                    config, dataset, kind=kind, num_devices=devices, microbatches=microbatches,
                    log=quiet, stop_requested=stop_requested,
                    stage_timing_repeats=settings.timing_repeats,
                )  # fmt: skip
        except KeyboardInterrupt:
            rows.append(_interrupted_row(variant, kind, config))
            break
        rows.append(_row(variant, kind, config, result))
        if result.status != "completed":
            log(f"{variant}: {result.status}: {result.message}")
        if result.status == "interrupted":
            break
    return ParallelBenchmark(_with_speedups(rows, settings.tta_fractions), *_status(rows))


def _status(rows: Sequence[BenchmarkRow]) -> tuple[str, str]:
    """The benchmark's status: interrupted over diverged over completed."""
    for status in ("interrupted", "diverged"):
        bad = [r for r in rows if r.status == status]
        if bad:
            return status, "; ".join(f"{r.variant}: {r.message}" for r in bad)
    return "completed", ""


def _with_speedups(rows: list[BenchmarkRow], fractions: Sequence[float]) -> list[BenchmarkRow]:
    """Speed-ups over one device and the scanned loop; time to ``fractions`` of bp's accuracy."""
    done = [r for r in rows if r.status == "completed"]
    single = {r.algorithm: r.examples_per_s for r in done if r.schedule == "single"}
    one_device = {r.schedule: r.examples_per_s for r in done if r.devices == 1}
    bp = next((r.test_accuracy for r in done if (r.algorithm, r.schedule) == ("bp", "single")), 0)
    out = []
    for r in rows:
        if r.status == "completed" and r.evaluations:
            steps, seconds, accuracy = ([v] for v in zip(*r.evaluations, strict=True))
            reached = tuple(Reached.of(f, f * bp, steps, seconds, accuracy) for f in fractions)
            r = dataclasses.replace(r, time_to_accuracy=reached if bp else ())
        if r.schedule != "single" and r.status == "completed":
            measured = r.examples_per_s / one_device.get(r.schedule, math.nan)
            vs_single = r.examples_per_s / single.get(r.algorithm, math.nan)
            r = dataclasses.replace(r, measured_speedup=measured, vs_single=vs_single)
        out.append(r)
    return out


def _number(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def table_lines(rows: Sequence[BenchmarkRow], fractions: Sequence[float]) -> list[str]:
    """A markdown table of the rows (dashes for a run that did not complete)."""
    columns: list[tuple[str, Callable[[BenchmarkRow], str]]] = [
        ("variant", lambda r: r.variant),
        ("devices", lambda r: str(r.devices)),
        ("stage -> device", lambda r: ",".join(map(str, r.stage_devices)) or "-"),
        ("examples/s", lambda r: f"{r.examples_per_s:,.0f}"),
        ("test acc", lambda r: f"{r.test_accuracy:.4f}"),
        *reached_columns(fractions, lambda r: r.time_to_accuracy),
        ("stage ms (each alone)", lambda r: " / ".join(f"{t:.2f}" for t in r.stage_ms) or "-"),
        ("ideal speed-up", lambda r: _number(r.ideal_speedup)),
        ("measured speed-up", lambda r: _number(r.measured_speedup)),
        ("vs 1-device scanned", lambda r: _number(r.vs_single)),
        ("compile s", lambda r: f"{r.compile_s:.1f}"),
    ]
    dashes = ["-"] * (len(columns) - 1)
    cells = (
        [f(r) for _, f in columns]
        if r.status == "completed"
        else [f"{r.variant} ({r.status}: {r.message})", *dashes]
        for r in rows
    )
    return markdown_table([name for name, _ in columns], cells)


def notes(settings: ParallelBenchmarkSettings) -> list[str]:
    """How to read the table, and the CPU caveat when it applies."""
    devices = jax.local_devices()
    lines = [
        f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}); "
        f"{settings.bp.num_steps} minibatches of {settings.bp.batch_size} per run",
        "stage ms: each stage (hidden blocks, then the output layer) timed alone on one device "
        "(the schedule's own program with only that stage working): "
        "per tick for the sg pipeline, per minibatch (M forwards, M backwards, one update) for bp.",
        "ideal speed-up: S / B for the sg pipeline, S = sum of the stage times, B = the busiest "
        "device's share; M S / (S + (M - 1) B) for bp with M microbatches (exactly 1 for "
        "model-parallel bp: one minibatch crosses the devices one after another). Transfers and "
        "the devices' per-tick rendezvous are left out. measured speed-up: examples/s over the "
        "same schedule's on 1 device; vs 1-device scanned: over the single-device lax.scan loop.",
        "to f x bp acc: the seconds (measured at each evaluation, compile excluded, evaluations "
        "included) and steps to the first evaluation at f x the bp single-device run's accuracy.",
    ]
    if devices[0].platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        lines.append(
            f"CPU: the {len(devices)} simulated devices share this machine's {cores} "
            "cores, so the measured speed-up is bounded by the cores (and by XLA's own threads "
            "inside one device), not by the ideal, which assumes a processor per device."
        )
    return lines

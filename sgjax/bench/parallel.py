"""Layer-parallel benchmark: examples/s, accuracy and per-stage times of bp and sg schedules on
1, 2, 4... devices, with the ideal speed-up the stage times allow beside the measured one.

Every run trains the same number of minibatches from the same initial state on the same
minibatches, so test accuracies compare at an equal number of examples. Compile time is excluded
from examples/s (see ``sgjax.parallel.layers.train_layer_parallel`` and
``sgjax.training.loop.train_and_evaluate``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import jax

from sgjax.data.sources import Dataset
from sgjax.parallel.layers import ParallelRunResult, train_layer_parallel
from sgjax.training.config import TrainConfig
from sgjax.training.loop import RunResult, train_and_evaluate


@dataclasses.dataclass(frozen=True)
class ParallelBenchmarkSettings:
    sg: TrainConfig
    """The synthetic-gradient runs (mode sg or cdni)."""
    bp: TrainConfig
    """The backprop runs (mode bp), same network and steps."""
    device_counts: tuple[int, ...] = (1, 2, 4)
    microbatches: int = 4
    """GPipe's microbatches per minibatch."""
    timing_repeats: int = 20
    """Calls per stage when timing each stage alone."""


@dataclasses.dataclass(frozen=True)
class BenchmarkRow:
    variant: str
    algorithm: str
    """``bp``, ``sg`` or ``cdni``."""
    schedule: str
    """``single`` (the scanned single-device loop) or a ``sgjax.parallel.layers.KINDS`` entry."""
    devices: int
    stage_devices: tuple[int, ...]
    examples: int
    examples_per_s: float
    test_accuracy: float
    compile_s: float
    stage_ms: tuple[float, ...] = ()
    ideal_speedup: float = math.nan
    measured_speedup: float = math.nan
    """Examples/s over the same schedule's examples/s on one device."""
    vs_single: float = math.nan
    """Examples/s over the scanned single-device loop of the same algorithm."""


def _row(variant: str, schedule: str, config: TrainConfig, result: RunResult) -> BenchmarkRow:
    examples = result.steps_done * config.batch_size
    parallel = isinstance(result, ParallelRunResult)
    return BenchmarkRow(
        variant=variant,
        algorithm=config.mode,
        schedule=schedule,
        devices=result.num_devices if parallel else 1,
        stage_devices=result.stage_devices if parallel else (),
        examples=examples,
        examples_per_s=examples / result.train_time_s,
        test_accuracy=result.records[-1].test_accuracy if result.records else math.nan,
        compile_s=result.compile_time_s,
        stage_ms=result.stage_ms if parallel else (),
        ideal_speedup=result.ideal_speedup if parallel else math.nan,
    )


def run_parallel_benchmark(
    settings: ParallelBenchmarkSettings,
    dataset: Dataset,
    log: Callable[[str], None] = print,
) -> list[BenchmarkRow]:
    """Train every variant once; rows in the order bp single, model-parallel, GPipe, sg single,
    sg pipeline (device counts ascending), with speed-ups filled in."""
    counts = sorted({n for n in settings.device_counts if n <= len(jax.local_devices())})
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    plans: list[tuple[str, str, TrainConfig, int]] = [
        ("bp model-parallel", "bp_model_parallel", settings.bp, 1),
        (f"bp GPipe M={settings.microbatches}", "bp_gpipe", settings.bp, settings.microbatches),
        (f"{settings.sg.mode} layer-parallel pipeline", "sg_pipeline", settings.sg, 1),
    ]
    rows: list[BenchmarkRow] = []
    for config, variant in ((settings.bp, "bp"), (settings.sg, settings.sg.mode)):
        log(f"{variant}: single device, scanned loop ...")
        result = train_and_evaluate(config, dataset, log=quiet)
        rows.append(_row(f"{variant} single device (scanned)", "single", config, result))
    for variant, kind, config, micro in plans:
        for n in counts:
            log(f"{variant} on {n} device(s) ...")
            result = train_layer_parallel(
                config,
                dataset,
                kind=kind,
                num_devices=n,
                microbatches=micro,
                log=quiet,
                stage_timing_repeats=settings.timing_repeats,
            )
            rows.append(_row(variant, kind, config, result))
    return _with_speedups(rows)


def _with_speedups(rows: list[BenchmarkRow]) -> list[BenchmarkRow]:
    single = {r.algorithm: r.examples_per_s for r in rows if r.schedule == "single"}
    one_device = {r.schedule: r.examples_per_s for r in rows if r.devices == 1}
    out = []
    for r in rows:
        if r.schedule == "single":
            out.append(r)
            continue
        out.append(
            dataclasses.replace(
                r,
                measured_speedup=r.examples_per_s / one_device.get(r.schedule, math.nan),
                vs_single=r.examples_per_s / single.get(r.algorithm, math.nan),
            )
        )
    return out


def _number(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def table_lines(rows: Sequence[BenchmarkRow]) -> list[str]:
    """A markdown table of the rows."""
    headers = [
        "variant",
        "devices",
        "stage -> device",
        "examples/s",
        "test acc",
        "stage ms (each alone)",
        "ideal speed-up",
        "measured speed-up",
        "vs 1-device scanned",
        "compile s",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [
            r.variant,
            str(r.devices),
            ",".join(map(str, r.stage_devices)) or "-",
            f"{r.examples_per_s:,.0f}",
            f"{r.test_accuracy:.4f}",
            " / ".join(f"{t:.2f}" for t in r.stage_ms) or "-",
            _number(r.ideal_speedup),
            _number(r.measured_speedup),
            _number(r.vs_single),
            f"{r.compile_s:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def notes(settings: ParallelBenchmarkSettings) -> list[str]:
    """How to read the table, and the CPU caveat when it applies."""
    devices = jax.local_devices()
    lines = [
        f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}); "
        f"{settings.bp.num_steps} minibatches of {settings.bp.batch_size} per run",
        "stage ms: each stage (hidden blocks, then the output layer) timed alone on its device: "
        "per tick for the sg pipeline, per minibatch (M forwards, M backwards, one update) for bp.",
        "ideal speed-up: S / B for the sg pipeline, S = sum of the stage times, B = the busiest "
        "device's share; M S / (S + (M - 1) B) for bp with M microbatches (exactly 1 for "
        "model-parallel bp: one minibatch crosses the devices one after another). Transfers and "
        "host dispatch are left out. measured speed-up: examples/s over the same schedule's on "
        "1 device; vs 1-device scanned: over the single-device lax.scan loop.",
    ]
    if devices[0].platform == "cpu":
        lines.append(
            f"CPU: the {len(devices)} simulated devices share this machine's {_cores()} "
            "cores, so the measured speed-up is bounded by the cores (and by XLA's own threads "
            "inside one device), not by the ideal, which assumes a processor per device."
        )
    return lines

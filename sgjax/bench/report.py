"""Benchmark records: table rows (mean and std over seeds), table.md with its summary, JSON."""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sgjax.bench.names import (
    MODE_NAMES,
    Reached,
    column_table,
    device_label,
    markdown_row,
    reached_columns,
    section,
)
from sgjax.bench.presets import PAPER_DEVICE, PAPER_RESULTS, PaperResult, paper_results
from sgjax.bench.programs import BenchmarkResult, LoopComparison, ProgramResult
from sgjax.bench.sweep import benchmark_mode, reads, sweep_label
from sgjax.training.architecture import config_facts, merge_depths
from sgjax.training.config import TrainConfig
from sgjax.training.loop import RunHistory
from sgjax.training.records import device_info, versions

PAPER_STEPS = sorted({r.num_steps for r in PAPER_RESULTS}, reverse=True)
RATE_TOLERANCE = 1.15  # achieved rates within this factor count as the same in the summary


def mode_label(config: TrainConfig) -> str:
    """'bp (backprop)', 'sg (DNI 2x1024)', 'cdni (cDNI linear)'."""
    name = MODE_NAMES[config.mode]
    if config.mode == "bp_lambda":
        name = f"BP({config.bp_lambda:g})"
    elif config.mode.startswith("stale_grad"):
        name += f" decay {config.stale_decay:g}"
    if config.synthetic_inputs:
        name += " + synthetic inputs"
    if config.update_prob != 1.0:
        name += f" p={config.update_prob:g}"
    module = config_facts(config).synthesizer
    mode = benchmark_mode(config)
    return f"{mode} ({name})" if module == "-" else f"{mode} ({name} {module})"


class Stat(NamedTuple):
    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: np.ndarray) -> Stat:
        values = np.asarray(values, np.float64)
        return cls(float(np.mean(values)), float(np.std(values)), int(values.size))

    def format(self, digits: int = 4) -> str:
        """'0.9512' for one seed, '0.9512 ± 0.0021' for several."""
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.count > 1 else "")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config: TrainConfig
    sweep: tuple[tuple[str, Any], ...]
    program: ProgramResult
    runs: slice
    time_ratio_bp: float | None
    flop_ratio_bp: float | None
    thresholds: tuple[tuple[float, float], ...] = ()  # (fraction, of bp's final test accuracy)

    @property
    def history(self) -> RunHistory:
        return jax.tree_util.tree_map(lambda x: x[self.runs], self.program.history)

    def final(self, metric: str) -> Stat:
        return Stat.of(getattr(self.history, metric)[:, -1])

    def time_to_accuracy(self) -> list[Reached]:
        """Per threshold, each seed's first evaluation reaching it; its seconds are the program's
        run time pro-rated to that step (the evaluations run inside the one compiled program)."""
        h, p = self.history, self.program
        seconds = h.step * (p.run_s / p.spec.config.num_steps)
        return [Reached.of(*t, h.step, seconds, h.test_accuracy) for t in self.thresholds]

    def to_dict(self) -> dict[str, Any]:
        p, metrics = self.program, ("test_accuracy", "test_loss", "train_accuracy", "train_loss")
        return {
            "label": self.label,
            "mode": benchmark_mode(self.config),
            "module": config_facts(self.config).synthesizer,
            "sweep": dict(self.sweep),
            "learning_rate": self.config.learning_rate,
            "seeds": list(p.spec.seeds),
            **{f"{m}_{s}": getattr(self.final(m), s) for m in metrics for s in ("mean", "std")},
            "test_accuracy_per_seed": self.history.test_accuracy[:, -1].tolist(),
            "time_to_accuracy": [r.to_dict() for r in self.time_to_accuracy()],
            **_attrs(p, "train_time_s=run_s runs_in_program=spec.num_runs ms_per_step"),
            "steps_per_s": 1e3 / p.ms_per_step,
            "compile_s": p.compile_s,
            "gflop_per_step": p.step_flops / 1e9,
            "gflop_per_evaluation": p.eval_flops / 1e9,
            "achieved_gflops": p.achieved_gflops,
            **_attrs(self, "time_ratio_bp flop_ratio_bp"),
            **_attrs(p, "peak_memory_bytes program_memory_bytes num_devices"),
        }


def _attrs(obj: Any, names: str) -> dict[str, Any]:
    """{key: obj.path} for each 'key=path' (or 'path', the key its last name) in ``names``."""
    pairs = (name.partition("=") for name in names.split())
    return {k.split(".")[-1]: operator.attrgetter(v or k)(obj) for k, _, v in pairs}


def _bp_key(row_sweep: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in row_sweep if reads("bp", k))


def build_rows(result: BenchmarkResult) -> list[Row]:
    """One row per program and learning rate; ratios against the bp row with the same values."""
    unrated = []
    for program in result.programs:
        spec = program.spec
        for index, lr in enumerate(spec.learning_rates):
            config = dataclasses.replace(spec.config, learning_rate=lr)
            sweep = spec.static + ((("learning_rate", lr),) if spec.lr_swept else ())
            label = mode_label(config) + sweep_label(sweep)
            unrated.append(Row(label, config, sweep, program, spec.runs_of(index), None, None))
    bp_rows = {_bp_key(r.sweep): r for r in unrated if r.config.mode == "bp"}
    rows = []
    for row in unrated:
        bp = bp_rows.get(_bp_key(row.sweep))
        if bp is not None:
            final = bp.final("test_accuracy").mean
            row = dataclasses.replace(
                row,
                time_ratio_bp=row.program.run_s / bp.program.run_s,
                flop_ratio_bp=row.program.step_flops / bp.program.step_flops,
                thresholds=tuple((f, f * final) for f in result.settings.tta_fractions),
            )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- table.md


def _bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


Column = tuple[str, Callable[[Row], str]]
TABLE_COLUMNS: tuple[Column, ...] = (
    ("run", lambda r: r.label),
    ("test accuracy", lambda r: r.final("test_accuracy").format()),
    ("training time (s)", lambda r: f"{r.program.run_s:.1f}"),
    ("ms/step", lambda r: f"{r.program.ms_per_step:.2f}"),
    ("steps/s", lambda r: f"{1e3 / r.program.ms_per_step:,.1f}"),
    ("compile (s)", lambda r: f"{r.program.compile_s:.1f}"),
    ("GFLOP/step", lambda r: f"{r.program.step_flops / 1e9:.3g}"),
    ("GFLOP/s", lambda r: f"{r.program.achieved_gflops:.1f}"),
    ("time / bp", lambda r: _number(r.time_ratio_bp)),
    ("FLOPs / bp", lambda r: _number(r.flop_ratio_bp)),
    ("peak device memory", lambda r: _bytes(r.program.peak_memory_bytes)),
    ("XLA program memory", lambda r: _bytes(r.program.program_memory_bytes)),
    ("seeds x runs/program", lambda r: f"{len(r.program.spec.seeds)} x {r.program.spec.num_runs}"),
)


def table_columns(fractions: Sequence[float]) -> tuple[Column, ...]:
    """TABLE_COLUMNS with, after the training time, one time-to-accuracy column per fraction."""
    return (
        *TABLE_COLUMNS[:3],
        *reached_columns(fractions, Row.time_to_accuracy),
        *TABLE_COLUMNS[3:],
    )


def _paper_row(paper: PaperResult, headers: Sequence[str]) -> list[str]:
    bp = next(r for r in PAPER_RESULTS if r.mode == "bp" and r.num_steps == paper.num_steps)
    cells = {
        "run": f"paper: {MODE_NAMES[paper.mode]}, {paper.num_steps // 1000}k steps "
        f"({PAPER_DEVICE})",
        "test accuracy": f"{paper.test_accuracy:.4f}",
        "training time (s)": f"{paper.train_time_s:.0f}",
        "ms/step": f"{paper.ms_per_step:.2f}",
        "steps/s": f"{1e3 / paper.ms_per_step:,.1f}",
        "time / bp": f"{paper.train_time_s / bp.train_time_s:.2f}",
    }
    return [cells.get(name, "-") for name in headers]


def learning_rate_schedule(boundaries: Sequence[int]) -> str:
    """'divided by 10 at 600, 800', or 'constant' without boundaries (--lr_boundaries=)."""
    return f"divided by 10 at {', '.join(map(str, boundaries))}" if boundaries else "constant"


def settings_lines(result: BenchmarkResult) -> list[str]:
    s = result.settings
    base = s.base
    datasets = "; ".join(ds.reason for ds in result.datasets.values())
    configs = [p.spec.config for p in result.programs] or [base]
    networks = merge_depths([config_facts(c).description for c in configs])
    return [
        f"- preset: {s.preset or 'none'}; modes: {','.join(s.modes)}; seeds: "
        f"{','.join(map(str, s.seeds))}"
        + (f"; sweeps: {' '.join(a.describe() for a in s.sweeps)}" if s.sweeps else "")
        + (f"; per task: {'; '.join(o.describe() for o in s.overrides)}" if s.overrides else ""),
        f"- network: {networks}; batch {base.batch_size}; {base.num_steps} steps; Adam "
        f"{base.learning_rate:g} {learning_rate_schedule(base.resolved_lr_boundaries)}; test "
        f"evaluation every {base.eval_every} steps (inside the program)",
        f"- data: {datasets}",
        f"- device: {device_label()}; float32 matmul {result.matmul_gflops:.0f} GFLOP/s",
        "- training time: wall time of the whole compiled run (every run of the program vmapped, "
        "test evaluations included, compile excluded); ms/step and steps/s are of that program; "
        "GFLOP/step is XLA's count for one step of one run; GFLOP/s counts every run's steps and "
        "evaluations; peak device memory is the process's peak so far (n/a where the backend "
        "keeps no statistics, e.g. the CPU); XLA program memory is the compiled program's "
        "arguments, outputs and temporaries",
        "- to f x bp acc: medians over seeds of the steps and seconds to the first evaluation at "
        "f x the bp row's final test accuracy (mean over seeds); the seconds are the program's "
        "training time pro-rated by steps (the evaluations inside it are not timed apart)",
    ]


def loop_lines(result: BenchmarkResult) -> list[str]:
    if not result.loops:
        return []
    whole = {  # one run alone of the program the loop was timed for
        t.mode: next(p for p in result.programs if p.spec.config == t.config) for t in result.loops
    }
    columns: tuple[tuple[str, Callable[[LoopComparison], str]], ...] = (
        ("mode", lambda t: mode_label(t.config)),
        ("lax.scan ms/step", lambda t: f"{t.scanned.ms_per_step:.2f}"),
        ("Python loop ms/step", lambda t: f"{t.python_loop.ms_per_step:.2f}"),
        ("loop / scan", lambda t: f"{t.ratio:.2f}"),
        ("steps x repeats", lambda t: f"{t.scanned.steps} x {t.scanned.repeats}"),
        (
            "whole compiled run ms/step (one run alone, evaluation included)",
            lambda t: _number(whole[t.mode].single_run_ms_per_step),
        ),
    )
    title = "lax.scan loop vs. the jitted step called from a Python loop"
    return section(title, column_table(columns, result.loops))


def rate_lines(result: BenchmarkResult, rows: Sequence[Row]) -> list[str]:
    matmul = result.matmul_gflops
    columns: tuple[Column, ...] = (
        ("run", lambda r: r.label),
        ("GFLOP/step", lambda r: f"{r.program.step_flops / 1e9:.3g}"),
        ("achieved GFLOP/s", lambda r: f"{r.program.achieved_gflops:.1f}"),
        ("matmul GFLOP/s", lambda r: f"{matmul:.0f}"),
        ("of matmul", lambda r: f"{100 * r.program.achieved_gflops / matmul:.0f}%"),
    )
    return section("Arithmetic rate", column_table(columns, rows))


def vmap_lines(result: BenchmarkResult) -> list[str]:
    compared = [p for p in result.programs if p.separate is not None]
    if not compared:
        return []
    columns: tuple[tuple[str, Callable[[ProgramResult], str]], ...] = (
        ("program", lambda p: mode_label(p.spec.config) + sweep_label(p.spec.static)),
        ("runs", lambda p: f"{p.spec.num_runs}"),
        ("vmapped (s)", lambda p: f"{p.run_s:.1f}"),
        ("separate (s)", lambda p: f"{p.separate.total_run_s:.1f}"),
        ("vmapped / separate", lambda p: f"{p.run_s / p.separate.total_run_s:.2f}"),
        (
            "compile (s) vmapped / one separate",
            lambda p: f"{p.compile_s:.1f} / {p.separate.compile_s:.1f}",
        ),
        ("largest difference of any metric (where)", lambda p: p.separate_difference().format()),
    )
    note = (
        "vmap batches the matrix products differently from a run alone, so results agree up to "
        "float reassociation, which training amplifies over many steps: compare the difference "
        "with the spread over seeds."
    )
    title = "Runs vmapped in one program vs. the same runs one after another"
    return section(title, column_table(columns, compared), note)


def summary_lines(result: BenchmarkResult, rows: Sequence[Row]) -> list[str]:
    lines, by_mode = [], {}
    for row in rows:
        by_mode.setdefault(benchmark_mode(row.config), []).append(row)
    for mode, tried in by_mode.items():  # a swept mode's best run (e.g. of --stale_decay's)
        best = max(tried, key=lambda r: r.final("test_accuracy").mean)
        text = f"- Best of the {len(tried)} {mode} runs: {best.label}"
        lines += [f"{text} ({best.final('test_accuracy').format()})."] * (len(tried) > 1)
    by_mode = {mode: tried[0] for mode, tried in by_mode.items()}
    bp = by_mode.get("bp")
    for mode in ("sg", "cdni", "sg_unlock", "cdni_unlock"):
        row = by_mode.get(mode)
        if row is None or row.time_ratio_bp is None or bp is None:
            continue
        lines.append(
            f"- {row.label} vs. bp: training time ratio {row.time_ratio_bp:.2f}, FLOP ratio "
            f"{row.flop_ratio_bp:.2f} ({row.program.step_flops / 1e9:.3g} vs. "
            f"{bp.program.step_flops / 1e9:.3g} GFLOP/step), achieved "
            f"{row.program.achieved_gflops:.0f} vs. {bp.program.achieved_gflops:.0f} GFLOP/s."
        )
    ratios = []
    for steps in PAPER_STEPS:
        paper = {r.mode: r.train_time_s for r in paper_results(steps)}
        ratios.append(f"{paper['sg'] / paper['bp']:.2f}x backprop's time at {steps // 1000}k steps")
    paper = {r.mode: r.test_accuracy for r in paper_results(PAPER_STEPS[0])}
    lines.append(
        f"- The paper ({PAPER_DEVICE}) reports SG-DNI training in {' and '.join(ratios)}, and "
        "concludes it is over 3x faster: it compared the time of a fixed number of steps, after "
        f"which its SG-DNI was less accurate ({paper['sg']:.4f} vs. {paper['bp']:.4f} at "
        f"{PAPER_STEPS[0] // 1000}k), not the time to reach an accuracy."
    )
    reference = by_mode.get("sg") or by_mode.get("cdni")
    if reference is not None and reference.time_ratio_bp is not None and bp is not None:
        lines.append(_verdict(reference, bp, result))
        paper_line = _paper_rate_line(reference, bp)
        if paper_line:
            lines.append(paper_line)
    lines.append(
        "- On one device a decoupled step does all of backprop's network arithmetic plus the "
        "modules' forward and backward passes; decoupling saves wall time only when the layers "
        "run on separate devices at once (layer-parallel), which these single-program runs do not."
    )
    return lines + _time_to_accuracy_lines(by_mode)


def _time_to_accuracy_lines(by_mode: dict[str, Row]) -> list[str]:
    """Every mode's median time to each fraction of bp's accuracy; why bp is first if it is."""
    bp, ref = by_mode.get("bp"), by_mode.get("sg") or by_mode.get("cdni")
    lines, firsts = [], set()
    for i, (fraction, threshold) in enumerate(bp.thresholds if bp else ()):
        reached = {m: r.time_to_accuracy()[i] for m, r in by_mode.items() if r.thresholds}
        times = {m: t for m, r in reached.items() if (t := r.median(r.seconds)) is not None}
        firsts.add(first := min(times, key=times.__getitem__, default="no mode"))
        lines.append(
            f"- Time to {fraction:g} x bp's final test accuracy ({threshold:.4f}), median over "
            f"seeds: {', '.join(f'{m} {r.cell()}' for m, r in reached.items())}; {first} first."
        )
    if firsts == {"bp"} and ref is not None and ref.thresholds:
        a, b = (r.time_to_accuracy()[-1] for r in (ref, bp))
        a, b = a.median(a.steps), b.median(b.steps)
        steps = f"and {a / b:.2f}x its steps to" if a else "and its median seed never reaches"
        lines.append(
            f"- Backprop gets there first: {ref.label} takes {ref.time_ratio_bp:.2f}x its time "
            f"per step {steps} the last threshold (its step does backprop's arithmetic and then "
            "its modules', one after the other: no layer here has a device of its own)."
        )
    return lines


def _verdict(row: Row, bp: Row, result: BenchmarkResult) -> str:
    time_ratio, flop_ratio = row.time_ratio_bp, row.flop_ratio_bp
    rate, bp_rate = row.program.achieved_gflops, bp.program.achieved_gflops
    rates = f"{rate:.0f} vs. {bp_rate:.0f} GFLOP/s, matmul {result.matmul_gflops:.0f}"
    head = (
        f"- On this device ({device_label()}) {row.config.mode} takes {time_ratio:.2f}x bp's time"
    )
    if time_ratio < 1:
        head += (
            f" although it does {flop_ratio:.2f}x the arithmetic per step: the paper's direction "
            "holds here"
        )
    else:
        head += ", so the paper's speed-up does not hold here"
    if rate > RATE_TOLERANCE * bp_rate:
        why = (
            f"; its time grows less than its arithmetic because its extra work runs at a higher "
            f"rate ({rates}): bp's smaller step leaves the device idle for a larger share of it."
        )
    elif rate * RATE_TOLERANCE < bp_rate:
        why = (
            f"; its time grows more than its arithmetic because it runs more, smaller operations "
            f"per step at a lower rate ({rates})."
        )
    else:
        why = f": the time follows the arithmetic, both run at about the same rate ({rates})."
    return head + why


def _paper_rate_line(row: Row, bp: Row) -> str:
    """For the paper's network: the GFLOP/s the paper's times imply at XLA's FLOP counts."""
    c = row.config
    network = (c.batch_size, c.hidden_layers, c.hidden_units, c.mode, config_facts(c).synthesizer)
    if network != (256, 3, 256, "sg", "2x1024"):  # not the paper's network
        return ""
    parts = []
    for steps in PAPER_STEPS:
        paper = {r.mode: r for r in paper_results(steps)}
        bp_rate = bp.program.step_flops * steps / paper["bp"].train_time_s / 1e9
        sg_rate = row.program.step_flops * steps / paper["sg"].train_time_s / 1e9
        parts.append(f"{bp_rate:.0f} (bp) and {sg_rate:.0f} (SG) GFLOP/s at {steps // 1000}k")
    return (
        "- At this network's FLOP counts the paper's times imply "
        + "; ".join(parts)
        + ": its backprop ran far slower per FLOP than its SG run, so its speed-up reflects a "
        "per-step overhead in its backprop run rather than less arithmetic."
    )


def table_markdown(result: BenchmarkResult, rows: Sequence[Row]) -> str:
    columns = table_columns(result.settings.tta_fractions)
    headers = [name for name, _ in columns]
    papers = paper_results(result.settings.base.num_steps)
    paper = [markdown_row(_paper_row(p, headers)) for p in papers]
    stopped = f"**Status: {result.status}** ({result.message}); the rows below are the programs"
    status = [] if result.status == "completed" else [f"{stopped} that finished.", ""]
    lines = [
        "# Backprop vs. synthetic gradients: one table",
        "",
        *status,
        *settings_lines(result),
        "",
        *column_table(columns, rows),
        *paper,
        *loop_lines(result),
        *rate_lines(result, rows),
        *vmap_lines(result),
        "",
        "## Summary",
        "",
        *summary_lines(result, rows),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- benchmark.json


def _program_dict(p: ProgramResult) -> dict[str, Any]:
    separate = p.separate
    return {
        "mode": benchmark_mode(p.spec.config),
        "static_sweep": dict(p.spec.static),
        "config": p.spec.config.to_dict(),
        "learning_rates": list(p.spec.learning_rates),
        "seeds": list(p.spec.seeds),
        **_attrs(p, "spec.num_runs num_devices compile_s run_s ms_per_step"),
        **_attrs(p, "flops_per_step=step_flops flops_per_evaluation=eval_flops"),
        **_attrs(p, "num_evaluations=num_evals total_flops achieved_gflops"),
        **_attrs(p, "peak_memory_bytes program_memory_bytes"),
        "separate_runs": None
        if separate is None
        else {
            **_attrs(separate, "compile_s total_run_s"),
            "run_s": list(separate.run_s),
            "vmapped_over_separate": p.run_s / separate.total_run_s,
            "largest_difference": p.separate_difference()._asdict(),
        },
        "history": {k: np.asarray(v).tolist() for k, v in p.history._asdict().items()},
    }


def build_json(result: BenchmarkResult, rows: Sequence[Row]) -> dict[str, Any]:
    return {
        "status": result.status,
        "message": result.message,
        "settings": result.settings.to_dict(),
        "device": {
            **device_info(),
            "process_count": jax.process_count(),
            "cpu_count": os.cpu_count(),
            "matmul_gflops": result.matmul_gflops,
        },
        "versions": versions(),
        "datasets": {name: ds.describe() for name, ds in result.datasets.items()},
        "table_columns": [name for name, _ in table_columns(result.settings.tta_fractions)],
        "rows": [row.to_dict() for row in rows],
        "paper": [p._asdict() for p in paper_results(result.settings.base.num_steps)],
        "loop_comparison": [
            {
                "mode": loop.mode,
                "config": loop.config.to_dict(),
                "scanned": dataclasses.asdict(loop.scanned),
                "python_loop": dataclasses.asdict(loop.python_loop),
                "loop_over_scan": loop.ratio,
            }
            for loop in result.loops
        ],
        "programs": [_program_dict(p) for p in result.programs],
        "summary": summary_lines(result, rows),
    }

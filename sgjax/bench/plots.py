"""Benchmark figures (matplotlib's object API on Agg: no global backend is changed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgjax.bench.names import mode_name
from sgjax.bench.programs import LoopComparison
from sgjax.bench.report import Row

DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _band(axes: Axes, steps: np.ndarray, values: np.ndarray, label: str, color: str) -> None:
    mean, std = values.mean(axis=0), values.std(axis=0)
    axes.plot(steps, mean, marker="o", markersize=3, label=label, color=color)
    if values.shape[0] > 1:
        axes.fill_between(steps, mean - std, mean + std, alpha=0.2, color=color)


def _log_scale(axes: Axes, values: Sequence[Any] = ()) -> None:
    """A log y axis where the lines (or ``values``) have a finite positive value."""
    values = [np.asarray(v, float) for v in values or [x.get_ydata() for x in axes.get_lines()]]
    if any(np.any(np.isfinite(v) & (v > 0)) for v in values):
        axes.set_yscale("log")


def _colors(count: int) -> list[str]:
    return [f"C{i % 10}" for i in range(count)]


def plot_curves(rows: Sequence[Row], path: Path) -> Path:
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    grid = figure.subplots(2, 2, sharex=True)
    panels = (
        (grid[0, 0], "train_accuracy", "train accuracy (chunk mean)"),
        (grid[0, 1], "test_accuracy", "test accuracy"),
        (grid[1, 0], "train_loss", "train loss (chunk mean)"),
        (grid[1, 1], "test_loss", "test loss"),
    )
    for row, color in zip(rows, _colors(len(rows)), strict=True):
        history = row.history
        steps = history.step[0]
        for axes, metric, _ in panels:
            _band(axes, steps, getattr(history, metric), row.label, color)
    for axes, _, title in panels:
        axes.set_title(title)
        axes.grid(alpha=0.3)
    for axes, _, _ in panels[2:]:
        axes.set_xlabel("step")
        _log_scale(axes)
    grid[0, 1].legend(fontsize="small")
    figure.suptitle("Learning curves (mean over seeds, band: +- 1 std)")
    return _save(figure, path)


def plot_accuracy_time(rows: Sequence[Row], path: Path) -> Path:
    """Test accuracy against the program's wall-clock seconds (pro-rated by steps, compile
    excluded), every row; dashed: the time-to-accuracy thresholds of the first row with any."""
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    for row, color in zip(rows, _colors(len(rows)), strict=True):
        seconds = row.history.step[0] * row.program.run_s / row.program.spec.config.num_steps
        _band(axes, seconds, row.history.test_accuracy, row.label, color)
    for fraction, threshold in next((r.thresholds for r in rows if r.thresholds), ()):
        axes.axhline(threshold, color="gray", linestyle="--", linewidth=0.8)
        where = dict(xycoords=("axes fraction", "data"), color="gray")
        axes.annotate(f"{fraction:g} x bp", (0.01, threshold), **where)
    axes.set(xlabel="wall-clock seconds (compile excluded)", ylabel="test accuracy", xlim=(0, None))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.suptitle("Test accuracy against wall-clock time (mean over seeds, band: +- 1 std)")
    return _save(figure, path)


def plot_sg_loss(rows: Sequence[Row], path: Path) -> Path:
    """Each decoupled row's module losses per layer (and synthetic-input losses)."""
    decoupled = [r for r in rows if r.config.decoupled]
    unlocked = [r for r in decoupled if r.config.synthetic_inputs]
    layers = max((r.config.hidden_layers for r in decoupled), default=1)
    panel_rows = 2 if unlocked else 1
    figure = Figure(figsize=(4.5 * layers, 4.2 * panel_rows), layout="constrained")
    grid = figure.subplots(panel_rows, layers, sharey="row", squeeze=False)
    colors = dict(zip((r.label for r in decoupled), _colors(len(decoupled)), strict=True))
    for row in decoupled:
        history = row.history
        losses = [history.sg_loss] + ([history.input_loss] if row.config.synthetic_inputs else [])
        for panel, loss in enumerate(losses):
            for layer in range(row.config.hidden_layers):
                axes = grid[panel, layer]
                _band(axes, history.step[0], loss[..., layer], row.label, colors[row.label])
    for layer in range(layers):
        grid[0, layer].set_title(f"module of hidden layer {layer + 1}")
        if unlocked:
            grid[1, layer].set_title(f"input model predicting hidden layer {layer + 1}'s output")
    for axes in grid.flat:
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        _log_scale(axes)
    grid[0, 0].set_ylabel("synthetic-gradient loss (chunk mean)")
    if unlocked:
        grid[1, 0].set_ylabel("synthetic-input loss (chunk mean)")
        grid[1, -1].legend(fontsize="small")
    if decoupled:
        grid[0, -1].legend(fontsize="small")
    else:
        grid[0, 0].text(0.5, 0.5, "no sg or cdni mode was run", ha="center", va="center")
    figure.suptitle("Synthetic-gradient loss per layer: ||M_i(h_i) - target_i||^2")
    return _save(figure, path)


def plot_time_per_step(
    rows: Sequence[Row], loops: Sequence[LoopComparison], matmul_gflops: float, path: Path
) -> Path:
    """Bars per row: ms per step (and Python loop), GFLOP per step, GFLOP/s."""
    figure = Figure(figsize=(14, 5), layout="constrained")
    time_axes, flop_axes, rate_axes = figure.subplots(1, 3)
    labels = [r.label for r in rows]
    positions = np.arange(len(rows))
    colors = _colors(len(rows))

    timed = [next((t for t in loops if t.config == r.program.spec.config), None) for r in rows]
    per_run_ms = [r.program.ms_per_step / r.program.spec.num_runs for r in rows]
    width = 0.27 if loops else 0.6
    time_axes.bar(positions, per_run_ms, width, color=colors, label="whole run compiled, per run")
    variants = (
        ("scanned", dict(alpha=0.6, hatch="..", label="lax.scan chunk")),
        ("python_loop", dict(alpha=0.35, hatch="//", label="jitted step from a Python loop")),
    )
    for shift, (name, style) in enumerate(variants if loops else (), 1):
        ms = [getattr(t, name).ms_per_step if t else np.nan for t in timed]
        time_axes.bar(positions + shift * width, ms, width, color=colors, **style)
    loop_ms = [ms for t in timed if t for ms in (t.scanned.ms_per_step, t.python_loop.ms_per_step)]
    tallest = max(per_run_ms + loop_ms)
    time_axes.set_ylim(0, 1.4 * tallest)  # room for the legend above the bars
    time_axes.legend(fontsize="small", loc="upper left")
    time_axes.set_title("time per step of one run (ms)")

    flop_axes.bar(positions, [r.program.step_flops / 1e9 for r in rows], 0.6, color=colors)
    flop_axes.set_title("GFLOP per step (XLA cost analysis)")

    rate_axes.bar(positions, [r.program.achieved_gflops for r in rows], 0.6, color=colors)
    rate_axes.axhline(matmul_gflops, color="black", linestyle="--", label="float32 matmul rate")
    rate_axes.set_title("achieved GFLOP/s")
    rate_axes.set_ylim(0, 1.3 * max(matmul_gflops, *[r.program.achieved_gflops for r in rows]))
    rate_axes.legend(fontsize="small", loc="upper left")

    for axes in (time_axes, flop_axes, rate_axes):
        axes.set_xticks(positions + (width if axes is time_axes and loops else 0))
        axes.set_xticklabels(labels, rotation=20, ha="right", fontsize="small")
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle("Cost per step of every mode")
    return _save(figure, path)


def plot_sweep(results: Sequence[Any], path: Path) -> Path:
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    for r, color in zip(results, _colors(len(results)), strict=True):
        axes.scatter(r.probs, r.test_error, s=12, color=color, label=mode_name(r.mode))
    axes.set_xlabel("update probability p")
    axes.set_ylabel("final test error %")
    _log_scale(axes, [r.test_error for r in results])
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)

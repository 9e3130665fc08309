"""The paper's Table 1 shape: test error % per task, depth and method, the paper's cells beside."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sgjax.bench.names import DATASET_NAMES, MODE_NAMES, MODEL_NAMES, device_label, markdown_table
from sgjax.bench.presets import GRID_MODES, PRESETS
from sgjax.bench.programs import BenchmarkResult
from sgjax.bench.report import Row, Stat
from sgjax.bench.sweep import SweepAxis, benchmark_mode
from sgjax.training.architecture import config_facts, merge_depths
from sgjax.training.config import (
    DEFAULT_SG_HIDDEN_LAYERS,
    PAPER_BOUNDARY_FRACTIONS,
    PAPER_FILTERS,
    PAPER_LEARNING_RATE,
    PAPER_NUM_STEPS,
    TrainConfig,
)

GRID_AXES = ("model", "hidden_layers", "dataset")
"""Sweeps a grid table can show: tasks and depths (any other swept flag would share cells)."""
PAPER_GRID: Mapping[tuple[str, str, int, str], float] = {
    ("mnist", "mlp", 3, "cdni"): 2.2,
    ("mnist", "mlp", 4, "cdni"): 1.9,
    ("mnist", "mlp", 5, "cdni"): 1.7,
    ("mnist", "mlp", 6, "cdni"): 1.6,
    ("cifar10", "mlp", 5, "bp"): 42.0,
    ("cifar10", "mlp", 5, "sg"): 47.0,
    ("cifar10", "mlp", 5, "cdni"): 44.0,
    ("cifar10", "cnn", 3, "bp"): 17.9,
    ("cifar10", "cnn", 3, "sg"): 19.5,
    ("cifar10", "cnn", 3, "cdni"): 19.0,
}
"""Test error % the paper's text quotes (Jaderberg et al. 2016, arXiv v1, 500k steps)."""
PAPER_FCN_UNITS = {"mnist": 256, "fashion_mnist": 256, "cifar10": 1000}
PAPER_FCN_MODULES = {"mnist": "2x1024", "fashion_mnist": "2x1024", "cifar10": "1x4000"}
"""DNI's synthesizer of the FCN (hidden layers x units); cDNI's is linear."""


class GridEntry(NamedTuple):
    """One grid cell's runs: their settings and final test errors (%, one per seed)."""

    config: TrainConfig
    errors: np.ndarray

    @property
    def depth(self) -> int:
        return self.config.hidden_layers + 1


class Cell(NamedTuple):
    """Our mean and std over seeds (None: not run) and the paper's number (None: not quoted)."""

    mean: float | None
    std: float | None
    seeds: int
    paper: float | None

    def format(self) -> str:
        ours = "-" if self.mean is None else Stat(self.mean, self.std, self.seeds).format(2)
        return ours if self.paper is None else f"{ours} (paper {self.paper:g})"


class GridRow(NamedTuple):
    """One task: what it ran on, how it differs from the paper ('none'), cells by (depth, mode)."""

    task: str
    dataset: str
    model: str
    steps: str
    network: str
    data: str
    device: str
    differences_from_paper: str
    cells: Mapping[tuple[int, str], Cell]


class Grid(NamedTuple):
    depths: tuple[int, ...]
    modes: tuple[str, ...]
    rows: tuple[GridRow, ...]

    def headers(self) -> list[str]:
        cells = [f"{d} layers {MODE_NAMES[m]}" for d in self.depths for m in self.modes]
        return ["task", *cells, "steps", "data", "device"]

    def body(self) -> list[list[str]]:
        keys = [(d, m) for d in self.depths for m in self.modes]
        cells = lambda row: [row.cells[k].format() for k in keys]  # noqa: E731
        return [[r.task, *cells(r), r.steps, r.data, r.device] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        cells = [
            [
                {"depth": d, "mode": m, "test_error_percent": c._asdict()}
                for (d, m), c in r.cells.items()
            ]
            for r in self.rows
        ]
        return {
            "headers": self.headers(),
            "depths": list(self.depths),
            "modes": list(self.modes),
            "rows": [{**r._asdict(), "cells": c} for r, c in zip(self.rows, cells, strict=True)],
            "paper": [
                {"dataset": k[0], "model": k[1], "depth": k[2], "mode": k[3], "error": v}
                for k, v in PAPER_GRID.items()
            ],
        }


def grid_applies(sweeps: Sequence[SweepAxis]) -> bool:
    """Whether a benchmark is a grid: it sweeps the model or depth and nothing but grid axes."""
    names = {axis.name for axis in sweeps}
    return bool(names & {"model", "hidden_layers"}) and names <= set(GRID_AXES)


def task_name(dataset: str, model: str) -> str:
    return f"{DATASET_NAMES[dataset]} {MODEL_NAMES[model]}"


def differences(configs: Sequence[TrainConfig], seeds: int) -> str:
    """How ``configs`` (one task's programs) differ from the paper's settings, or 'none'."""
    notes: list[str] = []
    first = configs[0]

    def note(field: str, paper: Any, template: str, join: Callable = _join) -> None:
        values = sorted({getattr(c, field) for c in configs})
        if values != [paper]:
            notes.append(template.format(join(values), paper))

    note("num_steps", PAPER_NUM_STEPS, "{} steps (paper {:,})")
    note("batch_size", 256, "batch {} (paper {})")
    rates = lambda values: ", ".join(f"{r:g}" for r in values)  # noqa: E731
    note("learning_rate", PAPER_LEARNING_RATE, "Adam {} (paper {:g})", rates)
    if any(c.resolved_lr_boundaries != _paper_boundaries(c.num_steps) for c in configs):
        bounds = sorted({c.resolved_lr_boundaries for c in configs})
        shown = "; ".join(",".join(map(str, b)) or "none" for b in bounds)
        notes.append(f"decay at {shown} (paper at 60% and 80%)")
    if first.model == "cnn":
        note("resolved_filters", PAPER_FILTERS[first.dataset], "{} filters (paper {})")
        note("kernel_size", 5, "kernel {} (paper {})")
    else:
        note("hidden_units", PAPER_FCN_UNITS[first.dataset], "{} units (paper {})")
    for c in configs:
        module = _module_difference(c)
        if module and module not in notes:
            notes.append(module)
    if seeds < 3:
        notes.append(f"{seeds} seed(s)")
    return "; ".join(notes) or "none"


def _join(values: Sequence[int]) -> str:
    return ", ".join(f"{v:,}" for v in values)


def _paper_boundaries(num_steps: int) -> tuple[int, ...]:
    return tuple(int(round(f * num_steps)) for f in PAPER_BOUNDARY_FRACTIONS)


def _module_difference(config: TrainConfig) -> str:
    """'' if the synthesizer (read off the built model) is the paper's, else both."""
    if not config.uses_synthesizers:
        return ""
    ours = config_facts(config).synthesizer
    if config.model == "cnn":
        depth = DEFAULT_SG_HIDDEN_LAYERS[config.mode]
        theirs = f"conv {depth}x{config.resolved_filters}" if depth else "conv linear"
    else:
        theirs = PAPER_FCN_MODULES[config.dataset] if config.mode == "sg" else "linear"
    return (
        "" if ours == theirs else f"{MODE_NAMES[config.mode]} synthesizer {ours} (paper {theirs})"
    )


def build_grid(
    entries: Sequence[GridEntry],
    data: Mapping[str, str],
    device: str,
    modes: Sequence[str] = GRID_MODES,
) -> Grid:
    """One row per task (first-seen order), every depth run; cells not run are '-'."""
    depths = tuple(sorted({e.depth for e in entries}))
    modes = tuple(m for m in GRID_MODES if m in modes)
    tasks: dict[tuple[str, str], list[GridEntry]] = {}
    for entry in entries:
        tasks.setdefault((entry.config.dataset, entry.config.model), []).append(entry)
    rows = []
    for (dataset, model), task_entries in tasks.items():
        stats = {(e.depth, benchmark_mode(e.config)): Stat.of(e.errors) for e in task_entries}
        cells = {
            (d, m): Cell(
                *stats.get((d, m), (None, None, 0)), PAPER_GRID.get((dataset, model, d, m))
            )
            for d in depths
            for m in modes
        }
        configs = [e.config for e in task_entries]
        steps = sorted({c.num_steps for c in configs})
        seeds = min(int(np.asarray(e.errors).size) for e in task_entries)
        network = merge_depths([config_facts(c).description for c in configs])
        data_name, notes = data.get(dataset, dataset), differences(configs, seeds)
        row = (task_name(dataset, model), dataset, model, _join(steps), network, data_name)
        rows.append(GridRow(*row, device, notes, cells))
    return Grid(depths, modes, tuple(rows))


def grid_markdown(grid: Grid, title_notes: Sequence[str] = ()) -> str:
    """grid.md: the table, each row's network and differences, the paper's other cells."""
    headers = grid.headers()
    lines = [
        "# Feed-forward grid: test error % (mean ± std over seeds), the paper's Table 1 shape",
        "",
        *title_notes,
        "",
        *markdown_table(headers, grid.body()),
        "",
        "Depth is the paper's layer count: hidden layers (conv stages for the CNN) plus the "
        "classifier. DNI: synthesizers with 2 hidden layers (1 for the CIFAR-10 FCN), cDNI: "
        "linear and label-conditioned; convolutional for the CNN. Zero gradient: the control, "
        "hidden layers frozen at initialisation and only the classifier trained: a method "
        "learns its hidden layers only where its cell is below this one. '(paper x)' is the "
        "test error the paper's text quotes for that cell at 500k steps; '-' is a cell not run.",
        "",
        *markdown_table(
            ("task", "network", "differs from the paper's settings"),
            ((row.task, row.network, row.differences_from_paper) for row in grid.rows),
        ),
    ]
    shown = {(row.dataset, row.model) for row in grid.rows}
    unshown = sorted({(k[0], k[1]) for k in PAPER_GRID} - shown, key=lambda t: (t[0] != "mnist", t))
    if unshown:
        lines += ["", "The paper also quotes (not run here):"]
        for dataset, model in unshown:
            cells = ", ".join(
                f"{depth} layers {MODE_NAMES[mode]} {error:g}"
                for (d, m, depth, mode), error in PAPER_GRID.items()
                if (d, m) == (dataset, model)
            )
            lines.append(f"- {task_name(dataset, model)}: {cells}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ from a benchmark


def grid_of(result: BenchmarkResult, rows: Sequence[Row]) -> Grid:
    entries = [GridEntry(row.config, 100 * (1 - row.history.test_accuracy[:, -1])) for row in rows]
    data = {  # 'mnist, 5,000 train / 10,000 test (embedded)'
        name: f"{ds.name}, {len(ds.train_labels):,} train / {len(ds.test_labels):,} test "
        f"({ds.source})"
        for name, ds in result.datasets.items()
    }
    return build_grid(entries, data, device_label(), result.settings.modes)


def grid_notes(result: BenchmarkResult) -> list[str]:
    s = result.settings
    preset = f"{s.preset} ({PRESETS[s.preset].description})" if s.preset else "none"
    lines = [
        f"- preset: {preset}",
        f"- seeds: {','.join(map(str, s.seeds))}; sweeps: "
        + " ".join(axis.describe() for axis in s.sweeps),
    ]
    if result.status != "completed":
        lines.append(
            f"- **Status: {result.status}** ({result.message}); cells of programs that did not "
            "finish are '-'."
        )
    return lines

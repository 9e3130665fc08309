"""The paper's Table 2 (``--preset=paper_rnn[_quick]``): largest Copy episode solved per cell."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import jax
import numpy as np

from sgjax.bench.names import MODE_NAMES, TASK_NAMES, device_label, markdown_table, write_report
from sgjax.bench.programs import compiled_flops, run_vmapped
from sgjax.core.recurrent import RECURRENT_MODES
from sgjax.recurrent.config import PAPER_RNN_LEARNING_RATE, RNNConfig
from sgjax.recurrent.programs import CopyProgram, CopyRunState
from sgjax.tasks.copy import COPY_TASKS

PAPER_CELLS: Mapping[tuple[str, str, int], int] = MappingProxyType(
    {
        ("repeat_copy", "bptt", 3): 5,
        ("repeat_copy", "dni", 3): 33,
        ("repeat_copy", "dni_aux", 3): 59,
    }
)
"""Published cells (Jaderberg et al. 2016, Table 2, as quoted in its text); the others are in
the paper and not transcribed here."""


@dataclasses.dataclass(frozen=True)
class RNNPreset:
    description: str
    hidden_units: int
    batch_size: int
    learning_rate: float
    num_steps: int
    num_seeds: int
    truncations: tuple[int, ...] = (2, 3, 4, 5)
    tasks: tuple[str, ...] = COPY_TASKS
    modes: tuple[str, ...] = RECURRENT_MODES
    bits: int = 8
    max_length: int = 256


RNN_PRESETS: Mapping[str, RNNPreset] = MappingProxyType(
    {
        "paper_rnn": RNNPreset(
            "the paper's Table 2 on Copy and Repeat Copy: LSTM 256, batch 256, Adam 7e-5, "
            "truncation 2-5, BPTT / DNI / DNI+Aux, 100k updates, 3 seeds vmapped (a GPU job)",
            hidden_units=256,
            batch_size=256,
            learning_rate=PAPER_RNN_LEARNING_RATE,
            num_steps=100_000,
            num_seeds=3,
        ),
        "paper_rnn_t3": RNNPreset(
            "the cell the paper quotes, Repeat Copy at T = 3, at its size (LSTM 256, batch 256, "
            "Adam 7e-5): BPTT, DNI, DNI+Aux, 100k updates, 3 seeds vmapped (a GPU job)",
            hidden_units=256,
            batch_size=256,
            learning_rate=PAPER_RNN_LEARNING_RATE,
            num_steps=100_000,
            num_seeds=3,
            truncations=(3,),
            tasks=("repeat_copy",),
        ),
        "paper_rnn_quick": RNNPreset(
            "Table 2's shape in about 15 minutes on a 2-core CPU: LSTM 32, batch 16, 4-bit "
            "patterns, episodes of at most 64 steps, Adam 1e-3, 20k updates, 2 seeds vmapped",
            hidden_units=32,
            batch_size=16,
            learning_rate=1e-3,
            num_steps=20_000,
            num_seeds=2,
            bits=4,
            max_length=64,
        ),
    }
)


@dataclasses.dataclass
class CellResult:
    task: str
    mode: str
    truncation: int
    solved: list[int]  # largest episode solved, per seed
    compile_s: float
    run_s: float
    ms_per_update: float  # one update of all the vmapped seeds
    flops_per_update: float  # XLA's, one update of one seed (NaN when not counted)


def cell_config(
    preset: RNNPreset, task: str, mode: str, truncation: int, num_steps: int | None = None
) -> RNNConfig:
    return RNNConfig(
        task=task, mode=mode, truncation=truncation, hidden_units=preset.hidden_units,
        batch_size=preset.batch_size, learning_rate=preset.learning_rate,
        num_steps=num_steps or preset.num_steps, bits=preset.bits, max_length=preset.max_length,
    )  # fmt: skip


def run_cell(config: RNNConfig, seeds: list[int], count_flops: bool = True) -> CellResult:
    program = CopyProgram(config)

    def whole_run(state: CopyRunState) -> jax.Array:
        return program.chunk(config.num_steps)(state, None)[0].solved

    # Each seed initialised in turn, not vmapped: the LSTM's orthogonal init vmapped over seeds
    # is a batched QR that can deadlock jaxlib 0.10.2's CPU thread pool (BUILD_NOTES.md, "The
    # deadlock"); lax.map gives the vmapped values bitwise.
    starts = jax.jit(lambda s: jax.lax.map(program.init, s))(np.asarray(seeds, np.uint32))
    run = run_vmapped(whole_run, (starts,), (0,))
    flops = float("nan")
    if count_flops:  # one update of one seed, the segment unrolled (XLA counts a loop body once)
        unrolled = CopyProgram(config, unroll=True)
        state = jax.eval_shape(lambda: unrolled.init(0))
        flops = compiled_flops(jax.jit(unrolled.chunk(1)).lower(state, None).compile())
    solved, ms = [int(s) for s in run.history], 1e3 * run.run_s / config.num_steps
    cell = (config.task, config.mode, config.truncation, solved, run.compile_s, run.run_s, ms)
    return CellResult(*cell, flops)


def _cell_text(cell: CellResult | None, paper: int | None) -> str:
    if cell is None:
        text = "not run"
    elif len(cell.solved) > 1:
        text = f"{statistics.mean(cell.solved):.1f} ± {statistics.stdev(cell.solved):.1f}"
    else:
        text = str(cell.solved[0])
    return text + (f" (paper {paper})" if paper is not None else "")


def table_markdown(
    preset_name: str, preset: RNNPreset, cells: list[CellResult], seeds: list[int], num_steps: int
) -> str:
    by_key = {(c.task, c.mode, c.truncation): c for c in cells}
    header = ["Task"] + [f"{MODE_NAMES[m]} T={t}" for m in preset.modes for t in preset.truncations]
    body = [
        [TASK_NAMES[task]]
        + [
            _cell_text(by_key.get((task, m, t)), PAPER_CELLS.get((task, m, t)))
            for m in preset.modes
            for t in preset.truncations
        ]
        for task in preset.tasks
    ]
    costs = [
        [TASK_NAMES[c.task], MODE_NAMES[c.mode], c.truncation, f"{c.ms_per_update:.3f}"]
        + [f"{c.flops_per_update / 1e9:.4f}", f"{c.compile_s:.1f}"]
        for c in cells
    ]
    lines = [
        f"# Largest episode solved ({preset_name})",
        "",
        f"Episode size as the paper counts it: N + 3 (Copy), N*R + 3 (Repeat Copy); solved: mean "
        f"error below 0.15 bits per output element. Mean ± std over seeds {seeds}; "
        f"{num_steps} updates; LSTM {preset.hidden_units}, batch {preset.batch_size}, "
        f"{preset.bits}-bit patterns, Adam {preset.learning_rate:g}, episodes padded to "
        f"{preset.max_length} steps. Device: {device_label()}. Paper cells in "
        "brackets (Jaderberg et al. 2016, Table 2).",
        "",
        *markdown_table(header, body),
        "",
        "ms per update (all seeds at once) and GFLOP per update of one seed (XLA's count after "
        "optimisation, the segment's steps unrolled for counting):",
        "",
        *markdown_table(["Task", "Mode", "T", "ms/update", "GFLOP/update", "compile s"], costs),
    ]
    return "\n".join(lines) + "\n"


def run_rnn_table(
    preset_name: str,
    output_dir: Path,
    *,
    seed: int = 0,
    num_seeds: int | None = None,
    num_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Every cell, writing table.md and results.json after each; (status, message)."""
    preset = RNN_PRESETS[preset_name]
    steps = num_steps or preset.num_steps
    seeds = list(range(seed, seed + (num_seeds or preset.num_seeds)))
    output_dir.mkdir(parents=True, exist_ok=True)
    cells: list[CellResult] = []
    total = len(preset.tasks) * len(preset.modes) * len(preset.truncations)
    status, message = "completed", ""

    def write() -> None:
        write_report(
            output_dir / "table.md",
            table_markdown(preset_name, preset, cells, seeds, steps),
            output_dir / "results.json",
            {
                "preset": preset_name,
                "description": preset.description,
                "status": status,
                "settings": dataclasses.asdict(preset) | {"num_steps": steps, "seeds": seeds},
                "cells": [dataclasses.asdict(c) for c in cells],
                "paper_cells": [
                    {"task": t, "mode": m, "truncation": k, "solved": v}
                    for (t, m, k), v in PAPER_CELLS.items()
                ],
            },
        )

    try:
        for task in preset.tasks:
            for truncation in preset.truncations:
                for mode in preset.modes:
                    config = cell_config(preset, task, mode, truncation, num_steps=steps)
                    cell = run_cell(config, seeds)
                    cells.append(cell)
                    log(
                        f"[{len(cells)}/{total}] {TASK_NAMES[task]} {MODE_NAMES[mode]} "
                        f"T={truncation}: largest solved {cell.solved} (compile "
                        f"{cell.compile_s:.1f} s, run {cell.run_s:.1f} s)"
                    )
                    write()
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted after {len(cells)} of {total} cells"
        write()
    return status, message

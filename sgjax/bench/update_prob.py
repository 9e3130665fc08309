"""The stochastic-update sweep (``--preset=update_prob_sweep``): error against p per method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sgjax.bench.names import device_label, markdown_table, mode_name, write_report
from sgjax.bench.plots import plot_sweep
from sgjax.bench.programs import flops_per_step, run_vmapped
from sgjax.data.device import DeviceData
from sgjax.training.architecture import config_facts
from sgjax.training.config import TrainConfig
from sgjax.training.loop import make_train

TABLE_PROBS = (0.05, 0.2, 0.5, 1.0)  # Jaderberg et al. quote DNI at 0.2 and cDNI at 0.05
BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
SWEEP_FILES = ("update_prob.md", "update_prob.json", "update_prob.png")


class SweepResult(NamedTuple):
    mode: str
    probs: np.ndarray
    seeds: np.ndarray
    test_error: np.ndarray  # final, %, per run
    compile_s: float
    run_s: float
    step_flops: float  # XLA's count for one step of one run


def run_sweep(
    base: TrainConfig,
    modes: Sequence[str],
    num_runs: int,
    data: DeviceData,
    log: Callable[[str], None] = print,
) -> list[SweepResult]:
    """One vmapped program per mode over ``num_runs`` p uniform in [0, 1], then ``TABLE_PROBS``."""
    drawn = np.random.default_rng(base.seed).uniform(0.0, 1.0, num_runs)
    probs = np.concatenate([drawn, TABLE_PROBS]).astype(np.float32)
    seeds = (base.seed + np.arange(len(probs))).astype(np.uint32)
    results = []
    for mode in modes:
        config = dataclasses.replace(base, mode=mode, update_prob=1.0)
        args = (seeds, np.float32(config.learning_rate), data, probs)
        run = run_vmapped(
            make_train(config), args, (0, None, None, 0), keep=lambda out: out[1].test_accuracy
        )
        error, run_s = 100.0 * (1.0 - run.history[:, -1]), run.run_s
        flops = flops_per_step(config, data)  # the plain step; the masks add a select per leaf
        results.append(SweepResult(mode, probs, seeds, error, run.compile_s, run_s, flops))
        at = ", ".join(f"p={p}: {_table_error(results[-1], p):.2f}%" for p in TABLE_PROBS)
        log(
            f"{mode}: {len(probs)} runs in {run_s:.1f} s (compile {run.compile_s:.1f} s); "
            f"test error {at}"
        )
    return results


def _table_error(result: SweepResult, p: float) -> float:
    index = len(result.probs) - len(TABLE_PROBS) + TABLE_PROBS.index(p)
    return float(result.test_error[index])


def sweep_markdown(results: Sequence[SweepResult], config: TrainConfig, device: str) -> str:
    bins = list(zip(BINS[:-1], BINS[1:], strict=True))

    def module(mode: str) -> str:
        return config_facts(dataclasses.replace(config, mode=mode)).synthesizer

    by_bin = []
    for r in results:
        drawn = slice(0, len(r.probs) - len(TABLE_PROBS))
        p, e = r.probs[drawn], r.test_error[drawn]
        cells = []
        for a, b in bins:
            chosen = (p >= a) & ((p < b) if b < 1.0 else (p <= b))
            cells.append(f"{e[chosen].mean():.2f} ({chosen.sum()})" if chosen.any() else "-")
        by_bin.append([mode_name(r.mode), *cells])
    costs = [
        [mode_name(r.mode), len(r.probs), f"{r.compile_s:.1f}", f"{r.run_s:.1f}"]
        + [f"{1e3 * r.run_s / config.num_steps:.1f}", f"{r.step_flops / 1e9:.3f}"]
        for r in results
    ]
    errors = [
        [mode_name(r.mode), *(f"{_table_error(r, p):.2f}" for p in TABLE_PROBS)] for r in results
    ]
    lines = [
        "# Stochastic updates: final test error % against the update probability p",
        "",
        *markdown_table(["method", *(f"p = {p}" for p in TABLE_PROBS)], errors),
        "",
        "Random-p runs by bin (mean test error %, number of runs):",
        "",
        *markdown_table(["method", *(f"[{a}, {b})" for a, b in bins)], by_bin),
        "",
        *markdown_table(
            ["method", "runs", "compile s", "run s", "ms/step (all runs)", "GFLOP/step (one run)"],
            costs,
        ),
        "",
        f"Settings: {config_facts(config).description}, {config.num_steps} steps of batch "
        f"{config.batch_size}, Adam {config.learning_rate:g} (boundaries "
        f"{list(config.resolved_lr_boundaries)}), DNI modules {module('sg')}, cDNI modules "
        f"{module('cdni')}, dataset {config.dataset}; run i has seed "
        f"{config.seed} + i; device {device}. A stage that skips an update keeps its optimizer "
        "state, so its Adam count (and learning-rate schedule) advances only with its own "
        "updates. The arithmetic of skipped updates is computed and discarded.",
        "",
    ]
    return "\n".join(lines)


def write_sweep(results: Sequence[SweepResult], config: TrainConfig, folder: Path) -> list[Path]:
    methods = [
        {
            "mode": r.mode,
            "update_prob": r.probs.tolist(),
            "seed": r.seeds.tolist(),
            "test_error_percent": r.test_error.tolist(),
            "compile_s": r.compile_s,
            "run_s": r.run_s,
            "flops_per_step": r.step_flops,
        }
        for r in results
    ]
    table, path, figure = (folder / name for name in SWEEP_FILES)
    text = sweep_markdown(results, config, device_label())
    record = {"config": config.to_dict(), "table_probs": list(TABLE_PROBS), "methods": methods}
    return [*write_report(table, text, path, record), plot_sweep(results, figure)]

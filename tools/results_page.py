"""Write docs/results.md and its figures from stored result folders (made by tools/results.sh).

Usage: python tools/results_page.py RUNS_DIR [--gpu=GPU_DIR] [--out=docs]

RUNS_DIR holds one folder per experiment (``feedforward``, ``stale``, ``grid``, ``rnn``,
``update_prob``), each with the files its benchmark wrote and ``command.txt``; GPU_DIR (default
RUNS_DIR/../gpu, made by tools/gpu_bench.sh) the same for the GPU runs. Every number on the page
is read from those files; an experiment whose folder is missing is listed as not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from sgjax.bench.names import DATASET_NAMES, MODE_NAMES, TASK_NAMES, markdown_table
from sgjax.bench.presets import PAPER_DEVICE, PAPER_RESULTS
from sgjax.bench.rnn_table import PAPER_CELLS

JADERBERG = "Jaderberg et al. 2016, arXiv:1608.05343 v1"
SEED = "Bisong, Benchmarking Decoupled Neural Interfaces with Synthetic Gradients"


class Folder(NamedTuple):
    """A stored result folder: its JSON record, the command that made it, its path."""

    path: Path
    record: dict[str, Any]
    command: str


def load(path: Path, record_name: str) -> Folder | None:
    record, command = path / record_name, path / "command.txt"
    if not record.exists():
        return None
    try:
        data = json.loads(record.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"results_page: {record} is not JSON ({error}); rerun it") from None
    text = command.read_text().strip() if command.exists() else "(command.txt missing)"
    return Folder(path, data, text)


def device_text(device: dict[str, Any] | None) -> str:
    if not device:
        return "unknown device"
    kind = device.get("device_kind", "?")
    if device.get("platform") == "cpu":
        cores = device.get("cpu_count")
        return f"CPU ({cores} cores)" if cores else "CPU"
    return f"{kind} x{device.get('device_count', 1)}"


def pm(values: Sequence[float], digits: int = 2, ddof: int = 0) -> str:
    """Mean ± std (ddof as the source's own table computes it)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return "-"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=ddof):.{digits}f}"


def figure(out: Path, name: str, source: Path) -> str:
    """Copy ``source`` to OUT/figures/NAME and return its markdown image line."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / "figures" / name)
    return f"![{name}](figures/{name})"


def label(axes: Any, title: str, x: str, y: str) -> None:
    axes.set(title=title, xlabel=x, ylabel=y)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def save(fig: Figure, out: Path, name: str) -> str:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "figures" / name, dpi=110, bbox_inches="tight")
    return f"![{name}](figures/{name})"


# ------------------------------------------------------------------------- benchmark.json folders


def bench_scale(folder: Folder, scale: str) -> str:
    rec = folder.record
    base = rec["settings"]["base_config"]
    data = ", ".join(
        f"{DATASET_NAMES.get(d['name'], d['name'])} ({d['train_size']:,} training / "
        f"{d['test_size']:,} test images)"
        for d in rec.get("datasets", {}).values()
    )
    shortened = folder.path / "shortened.txt"
    note = f" Steps: {shortened.read_text().strip()}." if shortened.exists() else ""
    return (
        f"{scale}: {base['num_steps']:,} steps of batch {base['batch_size']}, "
        f"{rec['settings']['num_seeds']} seeds (vmapped in one program per method), {data}, "
        f"{device_text(rec['device'])}.{note}"
    )


def tta_header(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Time-to-accuracy columns where the benchmark recorded them (rows' ``time_to_accuracy``)."""
    for row in rows:
        if row.get("time_to_accuracy"):
            return [f"{t['fraction']:g} x bp" for t in row["time_to_accuracy"]]
    return []


def tta_cell(entry: dict[str, Any]) -> str:
    """Median over seeds of the seconds and steps to the threshold; 'not reached' otherwise."""
    if entry.get("median_seconds") is None:
        reached = sum(s is not None for s in entry.get("steps", []))
        return f"not reached ({reached}/{len(entry.get('steps', []))} seeds)"
    return f"{entry['median_seconds']:.1f} s, {entry['median_steps']:,.0f} steps"


def bench_rows(folder: Folder, modes: Sequence[str]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(modes)}
    rows = [r for r in folder.record["rows"] if r["mode"] in order]
    return sorted(rows, key=lambda r: order[r["mode"]])


def bench_table(folder: Folder, modes: Sequence[str], paper: dict[str, str]) -> list[str]:
    rows = bench_rows(folder, modes)
    tta = tta_header(rows)
    headers = ["method", "test accuracy", "test error %", "run s (all seeds)", "ms/step"]
    headers += ["compile s", *(f"time to {t} accuracy" for t in tta), "published"]
    body = []
    for r in rows:
        acc = np.asarray(r["test_accuracy_per_seed"])
        cells = [r["label"], pm(acc, 4), pm(100 * (1 - acc)), f"{r['train_time_s']:.1f}"]
        cells += [f"{r['ms_per_step']:.2f}", f"{r['compile_s']:.1f}"]
        cells += [tta_cell(t) for t in r.get("time_to_accuracy") or []] or ["-"] * len(tta)
        body.append([*cells, paper.get(r["mode"], "-")])
    return markdown_table(headers, body)


def seed_published() -> dict[str, str]:
    text: dict[str, list[str]] = {}
    for p in PAPER_RESULTS:
        text.setdefault(p.mode, []).append(
            f"{100 * p.test_accuracy:.2f}% in {p.train_time_s:,.0f} s ({p.num_steps // 1000}k)"
        )
    return {mode: "; ".join(v) for mode, v in text.items()}


def curves_figure(folder: Folder, out: Path, name: str, modes: Sequence[str]) -> str:
    """Mean test accuracy over seeds against steps."""
    fig = Figure(figsize=(6.4, 4.0))
    axes = fig.subplots()
    for program in folder.record["programs"]:
        if program["mode"] not in modes:
            continue
        acc = np.asarray(program["history"]["test_accuracy"], np.float64)
        steps = np.asarray(program["history"]["step"], np.float64)
        if acc.ndim == 2:
            acc, steps = acc.mean(axis=0), steps[0]
        axes.plot(steps, acc, marker=".", label=MODE_NAMES.get(program["mode"], program["mode"]))
    label(axes, "", "step", "test accuracy (mean over seeds)")
    return save(fig, out, name)


# ---------------------------------------------------------------------------------- sections


class Section(NamedTuple):
    title: str
    render: Callable[[Path, Path, str], list[str]]  # (runs dir, out dir, scale) -> lines


def _header(folder: Folder | None, scale_line: str) -> list[str]:
    if folder is None:
        return ["Not run yet."]
    lines = [f"Command: `{folder.command}`", "", f"Scale: {scale_line}", ""]
    status = folder.record.get("status", "completed")
    if status != "completed":  # an interrupted benchmark: its finished programs only
        message = folder.record.get("message") or ""
        lines += [f"**Status: {status}** ({message}); add `--resume` to the command to finish.", ""]
    return lines


def tables_1_2(runs: Path, out: Path, scale: str) -> list[str]:
    folder = load(runs / "feedforward", "benchmark.json")
    if folder is None:
        return _header(None, "")
    modes = ("bp", "sg", "cdni", "zero_grad")
    lines = _header(folder, bench_scale(folder, scale))
    lines += bench_table(folder, modes, seed_published())
    lines += [
        "",
        f"Published ({SEED}; {PAPER_DEVICE}; MNIST 60,000 images, 1 run): the accuracy and "
        "seconds in the last column, at 500k and 100k steps. The zero-gradient row is the "
        "control: the same network whose hidden layers never train (only the output layer "
        "learns); a method that does not beat it has not learnt through its boundaries.",
        "",
        curves_figure(folder, out, f"{runs.name}_tables_steps.png", modes),
        *(
            [figure(out, f"{runs.name}_accuracy_time.png", folder.path / "accuracy_time.png")]
            if (folder.path / "accuracy_time.png").exists()
            else []
        ),
    ]
    return lines


def decoupling(runs: Path, out: Path, scale: str) -> list[str]:
    folder = load(runs / "feedforward", "benchmark.json")
    if folder is None:
        return _header(None, "")
    modes = ("bp", "sg", "cdni", "zero_grad", "stale_grad", "stale_grad_example", "dgl")
    modes += ("bp_lambda", "sg_unlock", "cdni_unlock")
    published = {
        "stale_grad": "9.1 / 11.8 / 15.4 / 19.0% error at 3-6 layers (MNIST FCN, best decay)",
        "sg_unlock": "about 2% error on MNIST",
        "cdni_unlock": "about 2% error on MNIST",
        "dgl": "85.6% (CIFAR-10 CNN; backprop 85.7%)",
    }
    lines = _header(folder, bench_scale(folder, scale))
    lines += bench_table(folder, modes, published)
    lines += [
        "",
        f"Published: {JADERBERG}, section 3.1 (stale gradient, complete unlock); Belilovsky et "
        "al.'s public reproduction of the CIFAR-10 CNN (greedy local learning). The "
        "zero-gradient row is the control every decoupled method must beat.",
    ]
    return lines


def stale(runs: Path, out: Path, scale: str) -> list[str]:
    lines = []
    for sub in sorted((runs / "stale").glob("*")) if (runs / "stale").exists() else []:
        folder = load(sub, "benchmark.json")
        if folder is None:
            continue
        modes = sorted({r["mode"] for r in folder.record["rows"]})
        lines += [f"### {sub.name}", "", *_header(folder, bench_scale(folder, scale))]
        lines += bench_table(folder, modes, {})
        lines.append("")
    return lines or ["Not run yet."]


def grid(runs: Path, out: Path, scale: str) -> list[str]:
    folder = load(runs / "grid", "benchmark.json")
    if folder is None or "grid" not in folder.record:
        return _header(None, "")
    table = folder.record["grid"]
    lines = _header(folder, bench_scale(folder, scale))
    modes, depths = table["modes"], table["depths"]
    fig = Figure(figsize=(4.0 * len(table["rows"]), 3.6))
    plots = np.atleast_1d(fig.subplots(1, len(table["rows"])))
    for axes, row in zip(plots, table["rows"], strict=True):
        cells = {(c["depth"], c["mode"]): c["test_error_percent"] for c in row["cells"]}
        body = []
        for d in depths:
            body.append([d, *(_grid_cell(cells.get((d, m))) for m in modes)])
        lines += [f"**{row['task']}** ({row['steps']}; {row['data']}; {row['device']})", ""]
        lines += markdown_table(["layers", *(MODE_NAMES.get(m, m) for m in modes)], body)
        lines += ["", f"Differences from the paper: {row['differences_from_paper']}", ""]
        for m in modes:
            ys = [cells.get((d, m), {}).get("mean") for d in depths]
            axes.plot(depths, [np.nan if y is None else y for y in ys], marker="o", label=m)
        label(axes, row["task"], "layers", "test error %")
        axes.set_yscale("log")
    lines += [
        f"Published cells (in brackets): {JADERBERG}, Table 1 as its text quotes it (500k steps of "
        "batch 256). The zero-gradient column is the control: the same network with frozen "
        "random hidden layers and a trained classifier.",
        "",
        save(fig, out, f"{runs.name}_grid.png"),
    ]
    return lines


def _grid_cell(cell: dict[str, Any] | None) -> str:
    if cell is None or cell.get("mean") is None:
        return "-"
    ours = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell.get("seeds", 1) > 1 else "")
    return ours + (f" (paper {cell['paper']:g})" if cell.get("paper") is not None else "")


def rnn(runs: Path, out: Path, scale: str) -> list[str]:
    folder = load(runs / "rnn", "results.json")
    if folder is None:
        return _header(None, "")
    rec, s = folder.record, folder.record["settings"]
    scale_line = (
        f"{scale}: {s['num_steps']:,} updates, LSTM {s['hidden_units']}, batch {s['batch_size']}, "
        f"{s['bits']}-bit patterns, Adam {s['learning_rate']:g}, episodes of at most "
        f"{s['max_length']} steps, seeds {s['seeds']}, {device_text(rec.get('device'))}."
    )
    lines = _header(folder, scale_line)
    cells = {(c["task"], c["mode"], c["truncation"]): c["solved"] for c in rec["cells"]}
    modes = list(dict.fromkeys(m for _, m, _ in cells))
    truncations = sorted({t for _, _, t in cells})
    fig = Figure(figsize=(8.0, 3.4))
    plots = np.atleast_1d(fig.subplots(1, len(s["tasks"])))
    for axes, task in zip(plots, s["tasks"], strict=True):
        body = []
        for t in truncations:
            row = [t]
            for m in modes:
                solved = cells.get((task, m, t))
                paper = PAPER_CELLS.get((task, m, t))
                text = "-" if solved is None else pm(solved, 1, ddof=1)
                row.append(text + (f" (paper {paper})" if paper is not None else ""))
            body.append(row)
        lines += [f"**{TASK_NAMES.get(task, task)}**: largest episode solved", ""]
        lines += markdown_table(["T", *(MODE_NAMES.get(m, m) for m in modes)], body) + [""]
        for m in modes:
            ys = [np.mean(cells.get((task, m, t), [np.nan])) for t in truncations]
            axes.plot(truncations, ys, marker="o", label=MODE_NAMES.get(m, m))
        label(axes, TASK_NAMES.get(task, task), "truncation T", "largest episode solved")
    lines += [
        f"Published (in brackets): {JADERBERG}, Table 2 (LSTM 256, batch 256, Adam 7e-5): Repeat "
        "Copy at T = 3. BPTT is the control: DNI must solve longer episodes than the truncation "
        "alone allows.",
        "",
        save(fig, out, f"{runs.name}_rnn.png"),
    ]
    return lines


def update_prob(runs: Path, out: Path, scale: str) -> list[str]:
    folder = load(runs / "update_prob", "update_prob.json")
    if folder is None:
        return _header(None, "")
    rec, c = folder.record, folder.record["config"]
    runs_per = len(rec["methods"][0]["update_prob"]) if rec["methods"] else 0
    scale_line = (
        f"{scale}: {c['num_steps']:,} steps of batch {c['batch_size']}, {runs_per} runs per "
        f"method (p uniform in [0, 1] plus p = {rec['table_probs']}), "
        f"{DATASET_NAMES.get(c['dataset'], c['dataset'])}, {device_text(rec.get('device'))}."
    )
    lines = _header(folder, scale_line)
    probs = rec["table_probs"]
    body = []
    for m in rec["methods"]:
        error = np.asarray(m["test_error_percent"])
        at = error[len(error) - len(probs) :]
        body.append([MODE_NAMES.get(m["mode"], m["mode"]), *(f"{e:.2f}" for e in at)])
    lines += markdown_table(["method (test error %)", *(f"p = {p}" for p in probs)], body)
    lines += [
        "",
        f"Published: {JADERBERG}, section 3.1: with 100 runs of p uniform in [0, 1], DNI still "
        "reaches 2% error at p = 0.2 and cDNI at p = 0.05. Backprop at the same p is the "
        "control: its first layer gets a gradient only when every layer above updates.",
        "",
        figure(out, f"{runs.name}_update_prob.png", folder.path / "update_prob.png"),
    ]
    return lines


SECTIONS = (
    Section("The seed's Tables 1-2: backprop, DNI and cDNI on MNIST", tables_1_2),
    Section("Decoupling baselines and the complete unlock", decoupling),
    Section("The stale-gradient baseline: decay search", stale),
    Section("The feed-forward grid (Jaderberg et al., Table 1)", grid),
    Section("Recurrent DNI: Copy and Repeat Copy (Jaderberg et al., Table 2)", rnn),
    Section("Stochastic updates", update_prob),
)


def page(runs: Path, gpu: Path | None, out: Path) -> str:
    lines = [
        "# Results",
        "",
        "Written by `python tools/results_page.py` from the stored result folders in "
        f"`{runs.as_posix()}`{f' and `{gpu.as_posix()}`' if gpu else ''} (do not edit by hand: "
        "`tools/results.sh RUNS_DIR` reruns the CPU experiments and this page; "
        "`tools/gpu_bench.sh` the GPU ones). Each section gives the command that made its "
        "numbers, the scale it ran at, mean ± std over seeds, the control a broken method "
        "would not beat, and the published number beside ours where one exists. CPU-scale runs "
        "are far shorter than the papers' (500k steps on a GPU): compare their order, not their "
        "digits, with the published ones. Seconds are each run's own on its machine, which may "
        "have been shared with other jobs: BUILD_NOTES.md, the lab record behind this page, says "
        "under what load each stored run was made. Time to accuracy is read at evaluations, so its "
        "resolution is the run's evaluation period.",
    ]
    same = gpu is not None and gpu.resolve() == runs.resolve()
    for where, scale in ((None if same else runs, "CPU-scale"), (gpu, "GPU")):
        if where is None:
            continue
        for section in SECTIONS:
            lines += ["", f"## {section.title} ({scale})", ""]
            lines += section.render(where, out, scale)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder of the CPU result folders")
    parser.add_argument("--gpu", type=Path, default=None, help="folder of the GPU result folders")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where results.md goes")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder; run tools/results.sh {args.runs} first")
    gpu = args.gpu or (args.runs.parent / "gpu")
    gpu = gpu if gpu.is_dir() else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(page(args.runs, gpu, args.out))
    print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

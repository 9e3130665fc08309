"""Learning curves of the complete unlock against bp and plain DNI/cDNI.

Usage: python tools/unlock_curves.py DIR [DIR ...] OUT.png. Each DIR holds a benchmark; one
benchmark with ``--modes=bp,sg,cdni,sg_unlock,cdni_unlock`` has every curve, or two (same other
flags): one with bp, sg and cdni and one run with --synthetic_inputs. Plots test accuracy (mean
over seeds) against steps and prints the values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgjax.bench.names import MODE_NAMES

NAMES = {mode: MODE_NAMES[mode] for mode in ("bp", "sg", "cdni")}
UNLOCKED = " + synthetic inputs"


def curves(folder: Path) -> dict[str, tuple]:
    """Method label -> (steps, mean test accuracy over seeds) for bp, DNI and cDNI, plain or
    unlocked, in ``folder`` (older benchmarks name an unlocked program by its mode only)."""
    data = json.loads((folder / "benchmark.json").read_text())
    out = {}
    for program in data["programs"]:
        mode = program["mode"].removesuffix("_unlock")
        if mode in NAMES:
            unlocked = program["config"].get("synthetic_inputs", False)
            history = program["history"]
            steps = np.asarray(history["step"])[0]
            accuracy = np.asarray(history["test_accuracy"]).mean(axis=0)
            out[NAMES[mode] + UNLOCKED * unlocked] = (steps, accuracy)
    return out


def main(*arguments: str) -> None:
    *folders, output = arguments
    lines = {label: curve for folder in folders for label, curve in curves(Path(folder)).items()}
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    for i, (label, (steps, accuracy)) in enumerate(lines.items()):
        style = "--" if "synthetic" in label else "-"
        axes.plot(steps, accuracy, style, marker="o", color=f"C{i}", label=label)
        print(label, " ".join(f"{s}:{a:.4f}" for s, a in zip(steps, accuracy, strict=True)))
    axes.set_xlabel("step")
    axes.set_ylabel("test accuracy (mean over seeds)")
    axes.grid(alpha=0.3)
    axes.legend()
    FigureCanvasAgg(figure)
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

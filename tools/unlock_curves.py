"""Learning curves of the complete unlock against bp and plain DNI/cDNI from two benchmarks.

Usage: python tools/unlock_curves.py PLAIN_DIR UNLOCK_DIR OUT.png, where PLAIN_DIR holds a
benchmark with bp, sg and cdni and UNLOCK_DIR one with sg and cdni run with --synthetic_inputs
(same other flags). Plots test accuracy (mean over seeds) against steps and prints the values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

NAMES = {"bp": "backprop", "sg": "DNI", "cdni": "cDNI"}


def curves(folder: Path, suffix: str, modes: tuple[str, ...]) -> dict[str, tuple]:
    """Mode label -> (steps, mean test accuracy over seeds) for ``modes`` in ``folder``."""
    data = json.loads((folder / "benchmark.json").read_text())
    out = {}
    for program in data["programs"]:
        if program["mode"] in modes:
            history = program["history"]
            steps = np.asarray(history["step"])[0]
            accuracy = np.asarray(history["test_accuracy"]).mean(axis=0)
            out[NAMES[program["mode"]] + suffix] = (steps, accuracy)
    return out


def main(plain: str, unlock: str, output: str) -> None:
    lines = {
        **curves(Path(plain), "", ("bp", "sg", "cdni")),
        **curves(Path(unlock), " + synthetic inputs", ("sg", "cdni")),
    }
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
    main(*sys.argv[1:4])

"""The figure of a recurrent run (curves.png): the curriculum and training loss for the copy
tasks, bits per character for char_lm. Drawn on the Agg canvas (no global backend change)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110


def plot_run(results: dict[str, Any], path: Path) -> Path:
    """Two panels against the update: the task's score and the training loss."""
    history = results["history"]
    steps = [r["step"] for r in history]
    figure = Figure(figsize=(11, 4), layout="constrained")
    score, loss = figure.subplots(1, 2)
    if results["task"] == "char_lm":
        for key, label in (("valid_bpc", "validation"), ("test_bpc", "test")):
            score.plot(steps, [r[key] for r in history], marker="o", markersize=3, label=label)
        score.set_ylabel("bits per character")
        score.legend()
    else:
        curve = results["curriculum"]
        xs = [0] + [c["step"] for c in curve] + [results["steps_done"]]
        ys = [0] + [c["episode_size"] for c in curve] + [results["max_episode_solved"]]
        score.step(xs, ys, where="post")
        score.set_ylabel("largest episode solved (N + 3, N*R + 3)")
    score.set_title(f"{results['task']} {results['mode']} (T={results['truncation']})")
    loss.plot(steps, [r["train_bits"] for r in history], marker="o", markersize=3)
    per = "character" if results["task"] == "char_lm" else "element"
    loss.set_ylabel(f"training loss, bits per {per}")
    loss.set_title("training loss (mean over each record's period)")
    for axes in (score, loss):
        axes.set_xlabel("update")
        axes.grid(alpha=0.3)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path

"""Shared by every report: method names, markdown tables, the device in words, report writing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from sgjax.training.records import device_info, versions, write_json_atomic

T = TypeVar("T")

MODE_NAMES = {
    "bp": "backprop",
    "sg": "DNI",
    "cdni": "cDNI",
    "bp_lambda": "BP(lambda)",
    "dgl": "greedy local",
    "zero_grad": "zero gradient",
    "stale_grad": "stale gradient",
    "stale_grad_example": "per-example stale gradient",
    "bptt": "BPTT",
    "dni": "DNI",
    "dni_aux": "DNI+Aux",
}
"""A method's name in tables and figures, by its ``--mode`` (feed-forward and recurrent)."""
TASK_NAMES = {"copy": "Copy", "repeat_copy": "Repeat Copy"}
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
MODEL_NAMES = {"mlp": "FCN", "cnn": "CNN"}


def mode_name(mode: str) -> str:
    return MODE_NAMES.get(mode, mode)


def markdown_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_table(headers: Sequence[str], rows: Iterable[Iterable[object]] = ()) -> list[str]:
    return [markdown_row(headers), "|" + "---|" * len(headers), *map(markdown_row, rows)]


def column_table(
    columns: Sequence[tuple[str, Callable[[T], object]]], items: Iterable[T]
) -> list[str]:
    return markdown_table([h for h, _ in columns], ([f(i) for _, f in columns] for i in items))


def section(title: str, table: list[str], *notes: str) -> list[str]:
    """A report section: a blank line, '## title', the table, then each note after a blank."""
    return ["", f"## {title}", "", *table, *(line for note in notes for line in ("", note))]


class Reached(NamedTuple):
    """Per seed, the step and seconds of the first evaluation whose test accuracy reached
    ``threshold`` (``fraction`` of bp's final), None where none did."""

    fraction: float
    threshold: float
    steps: tuple[int | None, ...]
    seconds: tuple[float | None, ...]

    @classmethod
    def of(cls, fraction: float, threshold: float, steps: Any, seconds: Any, accuracy: Any):
        """From (seeds, evaluations) arrays of steps, seconds and test accuracies."""
        first = [np.flatnonzero(np.asarray(a) >= threshold) for a in accuracy]
        at = [
            (int(s[i[0]]), float(t[i[0]])) if i.size else (None, None)
            for i, s, t in zip(first, steps, seconds, strict=True)
        ]
        return cls(fraction, threshold, *map(tuple, zip(*at, strict=True)))

    @staticmethod
    def median(values: Sequence[float | None]) -> float | None:  # never counts as never: None
        median = float(np.median([np.inf if v is None else v for v in values]))
        return None if np.isinf(median) else median

    def cell(self) -> str:  # '1.23 s, 150 steps' or 'not reached' (medians), and who reached
        seconds, n, missed = self.median(self.seconds), len(self.steps), self.steps.count(None)
        seeds = f" (reached by {n - missed}/{n} seeds)" if 0 < missed < n else ""
        steps = self.median(self.steps)
        return ("not reached" if seconds is None else f"{seconds:.2f} s, {steps:g} steps") + seeds

    def to_dict(self) -> dict[str, Any]:
        medians = {f"median_{k}": self.median(getattr(self, k)) for k in ("steps", "seconds")}
        return {**self._asdict(), **medians}


def reached_columns(
    fractions: Sequence[float], reached: Callable[[T], Sequence[Reached]]
) -> list[tuple[str, Callable[[T], str]]]:
    """A 'to f x bp acc' column per fraction: its ``Reached.cell()``, 'n/a' without any."""
    cell = lambda i: lambda item: reached(item)[i].cell() if reached(item) else "n/a"  # noqa: E731
    return [(f"to {f:g} x bp acc", cell(i)) for i, f in enumerate(fractions)]


def device_label() -> str:
    """'cpu, 2 cores' ('cpu x4, 2 cores' with 4 host devices) or 'gpu, NVIDIA H100 x1'."""
    device = device_info()
    count = device["device_count"]
    if device["platform"] == "cpu":
        return f"cpu{f' x{count}' if count > 1 else ''}, {os.cpu_count()} cores"
    return f"{device['platform']}, {device['device_kind']} x{count}"


def write_report(table: Path, text: str, record_path: Path, record: dict[str, Any]) -> list[Path]:
    """Write ``text`` to ``table`` and ``record`` (JSON, with device and versions)."""
    table.write_text(text)
    write_json_atomic(record_path, {"device": device_info(), "versions": versions(), **record})
    return [table, record_path]

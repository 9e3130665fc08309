"""Shared by every report: method names, markdown tables, the device in words, report writing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

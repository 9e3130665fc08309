"""The README's library examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_examples_run() -> None:
    text = README.read_text()
    section = text[text.index("## As a library") : text.index("## Data")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (32, 10)
    assert namespace["history"].test_accuracy.shape == (4, 2)
    assert float(namespace["history"].test_accuracy[:, -1].min()) > 0.5


def test_recurrent_library_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Recurrent DNI") : text.index("## Layer-parallel training")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    prelude = "import jax\nimport jax.numpy as jnp\nimport optax\nimport sgjax\n"
    exec(compile(prelude + blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert namespace["carry"][1].shape == (8, 16)
    assert float(namespace["seg_metrics"].count) == 32  # 4 steps x 8 sequences

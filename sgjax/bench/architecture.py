"""Architecture facts read off the built model, never recomputed by hand from config strings.

``facts(trainer, sample_x)`` traces ``Trainer.init`` with ``jax.eval_shape`` (nothing is
allocated or computed) and reads the module tree and the state's shapes: parameter count, bytes
of the whole training state, the shapes crossing the decoupled boundaries, and the network and
its synthetic-gradient modules in words for the tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.trainer import Trainer
from sgjax.training.config import TrainConfig
from sgjax.training.model import sample_shape, trainer_for

BLOCK_WORDS = {"HiddenBlock": "Dense-BN-ReLU", "ConvBlock": "Conv-BN-ReLU-pool"}
"""Stage modules named by what they chain; any other stage is named by its first layer."""


class Facts(NamedTuple):
    """What the built model is, for reports and memory checks."""

    param_count: int
    """Trainable parameters: stages, synthesizers (or auxiliary heads) and input models."""
    state_bytes: int
    """Every array of the training state: parameters, BatchNorm statistics, optimizer state
    and per-example tables (the stale gradient's)."""
    boundary_shapes: tuple[tuple[int, ...], ...]
    """Per-example shape of each decoupled group's output, bottom to top (none for backprop)."""
    description: str
    """The chain of stages, e.g. '3x256 (Dense-BN-ReLU) + Dense 10'."""
    synthesizer: str
    """The synthetic-gradient module: '-', 'linear', '2x1024', 'conv linear' or 'conv 2x64'."""


def facts(trainer: Trainer, sample_x: Any) -> Facts:
    """The facts of ``trainer`` for inputs like ``sample_x`` (an array or ShapeDtypeStruct)."""
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), sample_x)
    params = [s.params for s in (*state.stages, *state.synthesizers, *state.inputs)]
    leaves = jax.tree_util.tree_leaves(state)
    synthesizer = "-"
    if getattr(trainer.method, "synthesizer", None) is not None and state.synthesizers:
        synthesizer = _synthesizer_label(state.synthesizers[0].params)
    return Facts(
        param_count=sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)),
        state_bytes=sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves),
        boundary_shapes=tuple(s.shape[1:] for s in trainer.boundary_shapes(sample_x)),
        description=_describe(trainer.stages, [s.params for s in state.stages]),
        synthesizer=synthesizer,
    )


@functools.lru_cache(maxsize=256)
def config_facts(config: TrainConfig) -> Facts:
    """``facts`` of the run configuration's trainer (built once per configuration)."""
    if config.mode == "stale_grad":  # its table's size does not change the network
        config = dataclasses.replace(config, train_examples=max(config.train_examples, 1))
    sample = jax.ShapeDtypeStruct(sample_shape(config), jnp.float32)
    return facts(trainer_for(config), sample)


def _kernels(params: Any) -> dict[str, tuple[int, ...]]:
    """Kernel shape of every layer of one module, by layer name ('Dense_0', 'Conv_1', ...)."""
    return {name: p["kernel"].shape for name, p in params.items() if "kernel" in p}


def _layer_number(name: str) -> int:
    return int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0


def _synthesizer_label(params: Any) -> str:
    kernels = _kernels(params)
    first = kernels[min(kernels, key=_layer_number)]
    depth = len(kernels) - 1
    size = f"{depth}x{first[-1]}" if depth else "linear"
    return f"conv {size}" if len(first) == 4 else size


def _stage_label(module: Any, params: Any) -> tuple[str, bool]:
    """('256 (Dense-BN-ReLU)', True) for a block, ('Dense 10', False) for a single layer."""
    kernels = _kernels(params)
    word = BLOCK_WORDS.get(type(module).__name__)
    if not kernels:
        return type(module).__name__, False
    kernel = kernels[min(kernels, key=_layer_number)]
    if word is None:
        return f"{'Conv' if len(kernel) == 4 else 'Dense'} {kernel[-1]}", False
    if len(kernel) == 4:
        return f"{kernel[-1]} filters {kernel[0]}x{kernel[1]} ({word})", True
    return f"{kernel[-1]} ({word})", True


def _describe(modules: Sequence[Any], params: Sequence[Any]) -> str:
    """Runs of equal stages: '3x256 (Dense-BN-ReLU) + Dense 10', 'CNN 2x8 filters 5x5
    (Conv-BN-ReLU-pool) + Dense 10'."""
    runs: list[list[Any]] = []
    for label in (_stage_label(m, p) for m, p in zip(modules, params, strict=True)):
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    parts = [f"{n}x{text}" if block else text for (text, block), n in runs]
    conv = any(len(k) == 4 for p in params for k in _kernels(p).values())
    return ("CNN " if conv else "") + " + ".join(parts)


def merge_depths(descriptions: Sequence[str]) -> str:
    """Descriptions that differ only in their first count, as one: '2/3x256 (Dense-BN-ReLU) +
    Dense 10'; others joined with '; '."""
    merged: dict[str, list[str]] = {}
    for text in descriptions:
        match = re.search(r"(\d+)x", text)
        key = text if match is None else text[: match.start(1)] + "{}" + text[match.end(1) :]
        counts = merged.setdefault(key, [])
        if match is not None and match.group(1) not in counts:
            counts.append(match.group(1))
    return "; ".join(
        key.format("/".join(sorted(counts, key=int))) if counts else key
        for key, counts in merged.items()
    )

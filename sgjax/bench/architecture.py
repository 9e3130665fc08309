"""Architecture facts read off the built model (``Trainer.init`` traced by ``jax.eval_shape``:
nothing allocated), never recomputed by hand from config strings."""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.trainer import Trainer
from sgjax.training.config import TrainConfig
from sgjax.training.model import sample_shape, trainer_for

# The paper's blocks named by what they chain; any other stage by its class.
BLOCK_WORDS = {"HiddenBlock": "Dense-BN-ReLU", "ConvBlock": "Conv-BN-ReLU-pool"}


class Facts(NamedTuple):
    """What the built model is, for reports and memory checks."""

    param_count: int  # stages, synthesizers (or auxiliary heads) and input models
    state_bytes: int  # the whole training state, optimizer and per-example tables included
    boundary_shapes: tuple[tuple[int, ...], ...]  # per example, each decoupled group's output
    description: str  # the chain of stages, e.g. '3x256 (Dense-BN-ReLU) + Dense 10'
    synthesizer: str  # '-', 'linear', '2x1024', 'conv linear' or 'conv 2x64'


def facts(trainer: Trainer, sample_x: Any) -> Facts:
    """The facts of ``trainer`` for inputs like ``sample_x`` (an array or ShapeDtypeStruct)."""
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), sample_x)
    params = [s.params for s in (*state.stages, *state.synthesizers, *state.inputs)]
    leaves = jax.tree_util.tree_leaves(state)
    synthesizer = "-"
    if "synthesizer" in dict(trainer.method.options) and state.synthesizers:
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
    config = config.with_train_examples(config.train_examples or 1)  # stale_grad needs a count
    sample = jax.ShapeDtypeStruct(sample_shape(config), jnp.float32)
    return facts(trainer_for(config), sample)


def _kernels(params: Any) -> list[tuple[int, ...]]:
    """Shape of every ``kernel`` in a module's parameters, Dense_2 before Dense_10."""

    def order(path: tuple) -> list[tuple]:
        parts = (str(getattr(key, "key", key)) for key in path)
        return [tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)) for p in parts]

    leaves = jax.tree_util.tree_leaves_with_path(params)
    kernels = [(path, leaf) for path, leaf in leaves if getattr(path[-1], "key", None) == "kernel"]
    return [leaf.shape for path, leaf in sorted(kernels, key=lambda item: order(item[0]))]


def _synthesizer_label(params: Any) -> str:
    kernels = _kernels(params)
    size = f"{len(kernels) - 1}x{kernels[0][-1]}" if len(kernels) > 1 else "linear"
    return f"conv {size}" if len(kernels[0]) == 4 else size


def _stage_label(module: Any, params: Any) -> tuple[str, bool]:
    """('256 (Dense-BN-ReLU)', True) for a block (counted when repeated), ('Dense 10', False)
    for the classifier; another module by its class: '32 (Norm)'."""
    kernels, name = _kernels(params), type(module).__name__
    if name == "OutputLayer":
        return f"Dense {kernels[0][-1]}", False
    word = BLOCK_WORDS.get(name, name)
    if not kernels:
        return f"({word})", True
    k = kernels[0]
    return f"{f'{k[-1]} filters {k[0]}x{k[1]}' if len(k) == 4 else k[-1]} ({word})", True


def _describe(modules: Sequence[Any], params: Sequence[Any]) -> str:
    """Runs of equal stages: '3x256 (Dense-BN-ReLU) + Dense 10', 'CNN 2x8 filters 5x5
    (Conv-BN-ReLU-pool) + Dense 10'."""
    labels = [_stage_label(m, p) for m, p in zip(modules, params, strict=True)]
    runs = [(label, len(list(same))) for label, same in itertools.groupby(labels)]
    parts = [f"{n}x{text}" if block else text for (text, block), n in runs]
    conv = any(len(k) == 4 for p in params for k in _kernels(p))
    return ("CNN " if conv else "") + " + ".join(parts)


def merge_depths(descriptions: Sequence[str]) -> str:
    """Descriptions that differ only in their first count as one, '2/3x256 (Dense-BN-ReLU) +
    Dense 10'; different ones joined by '; '."""
    counts: dict[str, list[int]] = {}
    for text in descriptions:
        match = re.search(r"\d+(?=x)", text) or re.match("", text)
        key = text[: match.start()] + "{}" + text[match.end() :]
        counts.setdefault(key, [])
        if match.group() and int(match.group()) not in counts[key]:
            counts[key].append(int(match.group()))
    return "; ".join(key.format("/".join(map(str, sorted(n)))) for key, n in counts.items())

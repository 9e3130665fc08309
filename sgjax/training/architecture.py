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

from sgjax.core.layers import apply_module
from sgjax.core.trainer import Trainer
from sgjax.training.config import CONV_INPUT_SHAPES, TrainConfig
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
    stage_shapes: tuple[tuple[int, ...], ...] = ()  # per example, every stage's output


def value_count(tree: Any) -> int:
    """How many values the arrays (or ShapeDtypeStructs) of ``tree`` hold."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def byte_count(tree: Any) -> int:
    """How many bytes the arrays (or ShapeDtypeStructs) of ``tree`` take."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)


def facts(trainer: Trainer, sample_x: Any) -> Facts:
    """The facts of ``trainer`` for inputs like ``sample_x`` (an array or ShapeDtypeStruct)."""
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), sample_x)
    params = [s.params for s in (*state.stages, *state.synthesizers, *state.inputs)]
    outputs = jax.eval_shape(lambda st, x: _stage_outputs(trainer, st, x), state, sample_x)
    synthesizer = "-"
    if "synthesizer" in dict(trainer.method.options) and state.synthesizers:
        synthesizer = _synthesizer_label(state.synthesizers[0].params)
    return Facts(
        param_count=value_count(params),
        state_bytes=byte_count(state),
        boundary_shapes=tuple(s.shape[1:] for s in trainer.boundary_shapes(sample_x)),
        description=_describe(trainer.stages, [s.params for s in state.stages]),
        synthesizer=synthesizer,
        stage_shapes=tuple(o.shape[1:] for o in outputs),
    )


def _stage_outputs(trainer: Trainer, state: Any, x: jax.Array) -> list[jax.Array]:
    outputs = []
    for module, stage in zip(trainer.stages, state.stages, strict=True):
        x, _ = apply_module(module, stage.params, stage.collections, x, train=False)
        outputs.append(x)
    return outputs


def estimated_bytes(config: TrainConfig) -> int:
    """Rough device memory of a run: the training state (Adam moments, BatchNorm statistics, the
    stale-gradient table), one gradient per parameter, and a batch's activations (the input plus
    8 values per stage output: forward values, gradients, what BatchNorm and synthesizers keep)."""
    facts_ = config_facts(config)
    per_example = math.prod(sample_shape(config)) + 8 * sum(
        math.prod(s) for s in facts_.stage_shapes
    )
    return facts_.state_bytes + 4 * facts_.param_count + 4 * config.batch_size * per_example


def network_text(config: TrainConfig) -> str:
    """The network in words for results.json, e.g. '3x256 (Dense-BN-ReLU) + Dense 10: 784 ->
    256 -> 10'."""
    facts_ = config_facts(config)
    given = CONV_INPUT_SHAPES[config.dataset] if config.model == "cnn" else sample_shape(config)[1:]
    shapes = [given, *facts_.stage_shapes[-2:]]
    return f"{facts_.description}: " + " -> ".join("x".join(map(str, s)) for s in shapes)


def synthesizer_text(config: TrainConfig) -> str:
    """The boundary modules in words for results.json ('none (bp)' without synthesizers)."""
    label = config_facts(config).synthesizer
    if label == "-":
        return f"none ({config.mode})"
    return label + (", label-conditioned" if config.conditioned else "")


@functools.lru_cache(maxsize=256)
def config_facts(config: TrainConfig) -> Facts:
    """``facts`` of the run configuration's trainer (built once per configuration)."""
    config = config.with_train_examples(max(config.train_examples, 1))  # a placeholder count
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
    unpooled = getattr(module, "pooling", None) == ""
    word = BLOCK_WORDS.get(name, name).removesuffix("-pool" * unpooled)
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

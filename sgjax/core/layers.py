"""Layers of the paper's networks as Flax modules (called as ``module(x, train=...)``), how any
Linen or NNX module is initialised and applied with explicit variables, and the classification
loss and accuracy."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

STAGES = (
    "a stage is a flax.linen Module called as stage(x, train=...), an nnx.Module called as "
    "stage(x) (training or evaluation mode from .train() and .eval()), or a function rngs -> "
    "nnx.Module"
)


def _collections(module: nnx.Module) -> dict[str, Any]:
    """An NNX module's variables as Linen-style collections of plain arrays (RNG keys as key
    data); the empty ones left out, bar ``params``."""
    states = nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)[1:]
    keys = jax.dtypes.prng_key
    data = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, keys) else a  # noqa: E731
    names = ("params", "batch_stats", "rngs", "other")
    pure = {
        n: jax.tree_util.tree_map(data, nnx.to_pure_dict(s))
        for n, s in zip(names, states, strict=True)
    }
    return {n: v for n, v in pure.items() if v or n == "params"}


class NNXStage:
    """An ``nnx.Module`` as a stage through NNX's functional API: ``nnx.merge`` of its graph
    definition with its variables (``nnx.Param``: the params; the collections ``batch_stats``,
    ``rngs`` and ``other``), called as ``module(x)`` after ``.train()`` or ``.eval()``. Given an
    instance, ``init`` returns its variables whatever the key; given a function ``rngs ->
    nnx.Module``, builds it from the key (a different network per seed, also under vmap)."""

    def __init__(self, stage: nnx.Module | Callable[[nnx.Rngs], nnx.Module]) -> None:
        self.make = None if isinstance(stage, nnx.Module) else stage
        module = stage
        if self.make is not None:
            if not callable(stage):
                raise TypeError(f"{STAGES}; got {stage!r}")
            try:
                module = nnx.eval_shape(lambda: stage(nnx.Rngs(0)))
            except Exception as error:
                raise TypeError(f"{STAGES}; {stage!r} is none of them") from error
        if not isinstance(module, nnx.Module):
            raise TypeError(f"{STAGES}; {stage!r} made {module!r}")
        try:
            inspect.signature(module).bind(None)
        except (TypeError, ValueError):
            raise TypeError(f"{STAGES}; {type(module).__name__} is not callable so") from None
        self.graphdef = nnx.graphdef(module)
        self.variables = None if self.make else _collections(module)

    def init(self, key: jax.Array) -> tuple[Any, Any]:
        variables = dict(self.variables or _collections(self.make(nnx.Rngs(key))))
        return variables.pop("params"), variables

    def apply(self, params: Any, collections: Any, *args: Any, train: bool) -> tuple[Any, Any]:
        module = nnx.merge(self.graphdef, params, *collections.values())
        (module.train if train else module.eval)()
        out = module(*args)
        if not train:
            return out, collections
        return out, {k: v for k, v in _collections(module).items() if k != "params"}


def as_stage(stage: Any) -> nn.Module | NNXStage:
    """A ``Trainer``'s stage: a Linen module as it is, an NNX one (or maker) as an ``NNXStage``."""
    return stage if isinstance(stage, nn.Module | NNXStage) else NNXStage(stage)


def apply_module(
    module: nn.Module | NNXStage, params: Any, collections: Any, *args: Any, train: bool
) -> tuple[jax.Array, Any]:
    """``module(*args, train=train)`` and its other variables (updated only in training)."""
    if isinstance(module, NNXStage):
        return module.apply(params, collections, *args, train=train)
    variables = {"params": params, **collections}
    if train and collections:
        out, mutated = module.apply(variables, *args, train=True, mutable=list(collections))
        return out, {**collections, **mutated}
    return module.apply(variables, *args, train=train), collections


def init_module(key: jax.Array, module: nn.Module | NNXStage, *args: Any) -> tuple[Any, Any]:
    """Parameters and other variables of ``module`` initialised on example ``args``."""
    if isinstance(module, NNXStage):
        return module.init(key)
    variables = dict(module.init(key, *args, train=False))
    params = variables.pop("params", {})
    return params, variables


def batch_norm(train: bool) -> nn.BatchNorm:
    """The BatchNorm every layer of the package uses (the paper's TensorFlow defaults)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-5)


class HiddenBlock(nn.Module):
    """Dense -> BatchNorm -> ReLU."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        return nn.relu(batch_norm(train)(nn.Dense(self.features)(x)))


class OutputLayer(nn.Module):
    """Dense layer to the class logits."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

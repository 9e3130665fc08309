"""Layers of the paper's networks as Flax modules (called as ``module(x, train=...)``), how any
Linen or NNX module is initialised and applied with explicit variables, and the classification
loss and accuracy."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def _collections(module: Any) -> dict[str, Any]:
    """An NNX module's variables as Linen-style collections (RNG keys as key data; the empty
    ones left out, bar ``params``)."""
    from flax import nnx  # (only for NNX stages: it takes a while to import)

    keys = jax.dtypes.prng_key
    data = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, keys) else a  # noqa: E731
    states = nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)[1:]
    pure = [jax.tree_util.tree_map(data, nnx.to_pure_dict(s)) for s in states]
    names = ("params", "batch_stats", "rngs", "other")
    return {n: v for n, v in zip(names, pure, strict=True) if v or n == "params"}


class NNXStage:
    """An ``nnx.Module`` with Linen's ``init`` and ``apply`` through NNX's functional API:
    ``nnx.merge`` of its graph definition with its variables (``nnx.Param``s: ``params``; the
    ``batch_stats``, ``rngs`` and ``other`` collections), called as ``module(x)`` after
    ``.train()`` or ``.eval()``. Given an instance, ``init`` returns its variables whatever the
    key; given a function ``rngs -> nnx.Module``, builds it from the key (one per vmapped seed)."""

    def __init__(self, stage: Any) -> None:  # an nnx.Module or a function rngs -> nnx.Module
        from flax import nnx

        self.make = None if isinstance(stage, nnx.Module) else stage
        try:
            module = nnx.eval_shape(lambda: stage(nnx.Rngs(0))) if self.make else stage
            if not isinstance(module, nnx.Module):
                raise TypeError(f"it made {module}")
            inspect.signature(module).bind(None)
        except Exception as error:
            raise TypeError(
                "a stage is a flax.linen Module called as stage(x, train=...), an nnx.Module called"
                " as stage(x) (mode from .train() and .eval()) or a function rngs -> nnx.Module; "
                f"got {repr(stage).partition(chr(10))[0]}"
            ) from error
        self.graphdef = nnx.graphdef(module)
        self.variables = None if self.make else _collections(module)

    def init(self, key: jax.Array, *args: Any, train: bool = False) -> dict[str, Any]:
        from flax import nnx

        return self.variables or _collections(self.make(nnx.Rngs(key)))

    def apply(self, variables: Any, *args: Any, train: bool, mutable: Any = False) -> Any:
        from flax import nnx

        module = nnx.merge(self.graphdef, *variables.values())
        (module.train if train else module.eval)()
        out = module(*args)
        return (out, {k: _collections(module)[k] for k in mutable}) if mutable else out


def apply_module(
    module: nn.Module | NNXStage, params: Any, collections: Any, *args: Any, train: bool
) -> tuple[jax.Array, Any]:
    """``module(*args, train=train)`` and its other variables (updated only in training)."""
    variables = {"params": params, **collections}
    if train and collections:
        out, mutated = module.apply(variables, *args, train=True, mutable=list(collections))
        return out, {**collections, **mutated}
    return module.apply(variables, *args, train=train), collections


def init_module(key: jax.Array, module: nn.Module | NNXStage, *args: Any) -> tuple[Any, Any]:
    """Parameters and other variables of ``module`` initialised on example ``args``."""
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

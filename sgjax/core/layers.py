"""Layers of the paper's networks as Flax modules (called as ``module(x, train=...)``), how any
such module is initialised and applied with explicit variables, and the classification loss and
accuracy."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def apply_module(
    module: nn.Module, params: Any, collections: Any, *args: Any, train: bool
) -> tuple[jax.Array, Any]:
    """``module(*args, train=train)`` and its other variables (updated only in training)."""
    variables = {"params": params, **collections}
    if train and collections:
        out, mutated = module.apply(variables, *args, train=True, mutable=list(collections))
        return out, {**collections, **mutated}
    return module.apply(variables, *args, train=train), collections


def init_module(key: jax.Array, module: nn.Module, *args: Any) -> tuple[Any, Any]:
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

"""The network's layers as Flax modules, usable as pure functions.

Each hidden block is Dense -> BatchNorm -> ReLU; the output layer is a Dense layer to the logits.
Every layer is its own Flax module with its own variables, so a layer can be updated (and placed)
on its own. ``apply_block`` and ``apply_output`` are the pure-function forms used by the steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Variables = dict[str, Any]
"""A Flax variable collection: ``{"params": ..., "batch_stats": ...}``."""

BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-5


class HiddenBlock(nn.Module):
    """Dense -> BatchNorm -> ReLU.

    In training BatchNorm normalises with the batch's statistics and updates its running
    averages; in evaluation it uses the running averages.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.features)(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
        )(x)
        return nn.relu(x)


class OutputLayer(nn.Module):
    """Dense layer from the last hidden block to the class logits."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(x)


def init_block(key: jax.Array, in_features: int, features: int) -> Variables:
    """Initial variables (params and batch_stats) of a hidden block."""
    return dict(HiddenBlock(features).init(key, jnp.zeros((1, in_features)), train=False))


def init_output(key: jax.Array, in_features: int, num_classes: int) -> Variables:
    """Initial variables (params only) of the output layer."""
    return dict(OutputLayer(num_classes).init(key, jnp.zeros((1, in_features))))


def apply_block(params: Any, batch_stats: Any, x: jax.Array, train: bool) -> tuple[jax.Array, Any]:
    """Run a hidden block; returns its output and the (possibly updated) batch statistics."""
    features = params["Dense_0"]["bias"].shape[-1]
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return HiddenBlock(features).apply(variables, x, train=False), batch_stats
    out, mutated = HiddenBlock(features).apply(variables, x, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]


def apply_output(params: Any, x: jax.Array) -> jax.Array:
    """Logits of the output layer."""
    num_classes = params["Dense_0"]["bias"].shape[-1]
    return OutputLayer(num_classes).apply({"params": params}, x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

"""Layers of the paper's networks as Flax modules (called as ``module(x, train=...)``), and the
classification loss and accuracy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


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

"""Synthetic-gradient modules M_i: predict dLoss/dh_i from h_i (and, for cDNI, the label).

A module has 0, 1 or 2 (or more) hidden layers of Dense -> BatchNorm -> ReLU, then a Dense layer
to dim(h_i) whose weights and bias start at zero, so the first synthetic gradients are exactly 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgjax.layers import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, Variables


class SyntheticGradient(nn.Module):
    """A synthetic-gradient module; ``conditioned`` concatenates the one-hot label (cDNI)."""

    out_features: int
    hidden_layers: int
    hidden_units: int
    num_classes: int = 10
    conditioned: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, labels: jax.Array, train: bool) -> jax.Array:
        x = h
        if self.conditioned:
            x = jnp.concatenate([x, jax.nn.one_hot(labels, self.num_classes, dtype=h.dtype)], -1)
        for _ in range(self.hidden_layers):
            x = nn.Dense(self.hidden_units)(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BATCH_NORM_MOMENTUM,
                epsilon=BATCH_NORM_EPSILON,
            )(x)
            x = nn.relu(x)
        return nn.Dense(
            self.out_features, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros
        )(x)


def init_module(key: jax.Array, module: SyntheticGradient) -> Variables:
    """Initial variables of a synthetic-gradient module (``batch_stats`` is empty when linear)."""
    variables = dict(
        module.init(key, jnp.zeros((1, module.out_features)), jnp.zeros((1,), jnp.int32), False)
    )
    variables.setdefault("batch_stats", {})
    return variables


def apply_module(
    module: SyntheticGradient,
    params: Any,
    batch_stats: Any,
    h: jax.Array,
    labels: jax.Array,
    train: bool,
) -> tuple[jax.Array, Any]:
    """Synthetic gradient for ``h``; returns it and the (possibly updated) batch statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train or module.hidden_layers == 0:
        return module.apply(variables, h, labels, train=train), batch_stats
    out, mutated = module.apply(variables, h, labels, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]

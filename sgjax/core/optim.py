"""Optimizers whose initial learning rate lives in their state (``optax.inject_hyperparams``),
so one compiled program serves a sweep over rates, and a run's rate is read back from its state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def piecewise_schedule(
    learning_rate: float | jax.Array, boundaries: Sequence[int]
) -> optax.Schedule:
    """``learning_rate``, times 0.1 from each boundary on (update k uses ``schedule(k)``)."""
    return optax.piecewise_constant_schedule(learning_rate, {int(b): 0.1 for b in boundaries})


def adam(learning_rate: float, boundaries: Sequence[int] = ()) -> optax.GradientTransformation:
    """Adam with the paper's piecewise-constant decay; the rate is a hyperparameter in the state."""
    decay_at = tuple(int(b) for b in boundaries)
    factory = lambda learning_rate: optax.adam(piecewise_schedule(learning_rate, decay_at))  # noqa: E731
    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def _is_injected(node: Any) -> bool:
    # The state class of inject_hyperparams was renamed across optax versions; match its shape.
    return hasattr(node, "hyperparams") and hasattr(node, "inner_state")


def learning_rate_of(opt_state: Any) -> jax.Array:
    """The ``learning_rate`` hyperparameter of the first injected optimizer state in a tree."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(node) and "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    raise ValueError("no optimizer state with a learning_rate hyperparameter in this tree")


def with_learning_rate(tree: Any, learning_rate: float | jax.Array) -> Any:
    """``tree`` with every injected optimizer state's ``learning_rate`` set (traceable)."""

    def replace(node: Any) -> Any:
        if not _is_injected(node) or "learning_rate" not in node.hyperparams:
            return node
        old = node.hyperparams["learning_rate"]
        new = jnp.asarray(learning_rate, jnp.asarray(old).dtype)
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": new})

    return jax.tree_util.tree_map(replace, tree, is_leaf=_is_injected)


def apply_optimizer(
    optimizer: optax.GradientTransformation, grads: Any, opt_state: optax.OptState, params: Any
) -> tuple[Any, optax.OptState]:
    """One optimizer step on ``params``: the new parameters and optimizer state."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

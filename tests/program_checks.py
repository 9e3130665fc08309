"""Checks of compiled programs shared by the test files: a program vmapped over seeds computes
what each seed's own run computes; the types that decide whether jit compiles again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np


def assert_vmap_equals_separate_runs(run: Callable[[jax.Array], tuple[jax.Array, Any]]) -> None:
    """``run(seed) -> (loss, state)`` for seeds 0-2, vmapped and alone: equal to rounding, and
    the seeds' losses differ (so equal runs are not a seed that is ignored)."""
    seeds = jnp.arange(3)
    losses, states = jax.jit(jax.vmap(run))(seeds)
    for i in range(3):
        loss, state = jax.jit(run)(seeds[i])
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda a, i=i: a[i], states), state, rtol=1e-4, atol=1e-6
        )
    assert float(jnp.std(losses)) > 0  # different seeds really differ


def value_types(tree: Any) -> Any:
    """Shape, dtype and weak type of every leaf: what decides whether jit compiles again."""
    return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), jax.eval_shape(lambda: tree))

"""The paper's piecewise-constant learning rate: divided by 10 at each boundary."""

from __future__ import annotations

from collections.abc import Sequence

import optax

DECAY_FACTOR = 0.1


def piecewise_schedule(learning_rate: float, boundaries: Sequence[int]) -> optax.Schedule:
    """``learning_rate`` for steps before the first boundary, times 0.1 from each boundary on.

    Step ``k`` (0-based, the k-th optimizer update) uses ``schedule(k)``; with the paper's settings
    updates 0..299_999 use 3e-5, 300_000..399_999 use 3e-6 and the rest 3e-7.
    """
    return optax.piecewise_constant_schedule(
        learning_rate, {int(b): DECAY_FACTOR for b in boundaries}
    )


def make_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam with the given schedule; each layer and module keeps its own state of it."""
    return optax.adam(schedule)

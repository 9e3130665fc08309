"""What the training loop drives: an ``Engine`` advances a run by some steps and shows its state.

``sgjax.training.loop.run_engine`` owns everything around the steps (evaluation periods,
records, divergence, stop requests, checkpoints, results) and drives any engine: the
single-device compiled chunks (``sgjax.training.loop.ScanEngine``), a layer-parallel schedule
(``sgjax.parallel.layers.PipelineEngine``) or a recurrent program
(``sgjax.recurrent.loop.RecurrentEngine``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from sgjax.training.loop import TrainState


class ChunkMetrics(NamedTuple):
    """Host sums of the training metrics over the steps one ``advance`` ran."""

    steps: int
    loss: float
    """Sum over the steps of the training loss."""
    accuracy: float
    sg_loss: tuple[float, ...]
    """Per decoupled boundary, the sum of its synthesizer's regression losses."""
    sg_updates: tuple[int, ...] | None = None
    """Per boundary, how many synthesizer updates ``sg_loss`` sums (None: one per step)."""
    input_loss: tuple[float, ...] = ()
    """Complete unlock: per boundary the sum over the steps of its synthetic-input model's
    regression loss (empty for every other method)."""
    extra: Mapping[str, float] = {}
    """Sums of a task's own metrics, by name (the recurrent runs' element count and auxiliary
    loss); empty for the feed-forward engines."""


class Engine(Protocol):
    """One way of running training steps from a ``TrainState``."""

    max_chunk: int
    """The most steps one ``advance`` should run (the loop cuts evaluation periods by it)."""

    def compile(self, chunk_lengths: Collection[int]) -> None:
        """Compile everything ``advance`` (with these step counts) and ``evaluate`` run."""

    def advance(self, steps: int) -> ChunkMetrics:
        """Run ``steps`` more training steps; returns when their metrics are on the host."""

    def state(self) -> TrainState:
        """The current state, on one device (for evaluation, checkpoints and results)."""

    def evaluate(self) -> Any:
        """The test scores of the current state: loss and accuracy for the feed-forward
        engines, the task's named scores for a recurrent run (``RecurrentEngine``)."""

    def inflight(self) -> Mapping[str, Any]:
        """Work in flight that ``state()`` does not hold, by name (empty for most engines);
        an engine built from ``state()`` and these continues exactly (checkpoints)."""

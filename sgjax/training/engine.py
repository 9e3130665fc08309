"""What ``sgjax.training.loop.run_engine`` drives: an ``Engine`` advances a run by some steps and
shows its state (``ScanEngine``, ``PipelineEngine``, ``RecurrentEngine``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from sgjax.training.loop import TrainState


class ChunkMetrics(NamedTuple):
    """Host sums of the training metrics over the steps one ``advance`` ran."""

    steps: int
    loss: float
    accuracy: float
    sg_loss: tuple[float, ...]  # per decoupled boundary
    sg_updates: tuple[int, ...] | None = None  # updates sg_loss sums (None: one per step)
    input_loss: tuple[float, ...] = ()  # complete unlock only
    extra: Mapping[str, float] = {}  # a task's own sums (recurrent: element count, aux loss)


class Engine(Protocol):
    """One way of running training steps from a ``TrainState``."""

    max_chunk: int  # the most steps one ``advance`` should run

    def compile(self, chunk_lengths: Collection[int]) -> None:
        """Compile everything ``advance`` (with these step counts) and ``evaluate`` run."""

    def advance(self, steps: int) -> ChunkMetrics:
        """Run ``steps`` more training steps; returns when their metrics are on the host."""

    def state(self) -> TrainState:
        """The current state, on one device (for evaluation, checkpoints and results)."""

    def evaluate(self) -> Any:
        """The current state's test scores (loss and accuracy, or a task's named scores)."""

    def inflight(self) -> Mapping[str, Any]:
        """Work in flight that ``state()`` does not hold, by name (empty for most engines);
        an engine built from ``state()`` and these continues exactly (checkpoints)."""

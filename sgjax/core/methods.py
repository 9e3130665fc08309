"""Training methods: what each stage of a chain learns from.

* ``backprop()``: the true gradient of the loss, backpropagated through every stage.
* ``dni(...)``: decoupled boundaries after chosen stages, each with a synthesizer predicting the
  loss gradient there (Jaderberg et al. 2016); ``conditioned=True`` is cDNI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sgjax.core.synthesizers import Dense, SynthesizerFactory, dense

PAPER_DNI_SYNTHESIZER = Dense(hidden_layers=2, units=1024)
"""DNI's synthesizer in the paper: 2 hidden layers of 1024 units."""
PAPER_CDNI_SYNTHESIZER = Dense(hidden_layers=0)
"""cDNI's synthesizer in the paper: linear."""


@dataclasses.dataclass(frozen=True)
class Backprop:
    """Ordinary backpropagation through every stage (see ``backprop``)."""


@dataclasses.dataclass(frozen=True)
class DNI:
    """Decoupled training with synthetic gradients (see ``dni``)."""

    synthesizer: SynthesizerFactory
    conditioned: bool = False
    oracle: bool = False
    boundaries: tuple[int, ...] | None = None
    num_classes: int = 10


Method = Backprop | DNI


def backprop() -> Backprop:
    """Backpropagation: every stage gets the true gradient of the loss."""
    return Backprop()


def dni(
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    oracle: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
) -> DNI:
    """Synthetic gradients at decoupled boundaries.

    Args:
      synthesizer: builds each boundary's synthesizer (default: the paper's, ``dense(2, 1024)``
        for DNI and ``dense(0)`` for cDNI).
      conditioned: feed ``one_hot(label, num_classes)`` to every synthesizer (cDNI).
      oracle: use the true dLoss/dh_k in place of every synthetic gradient, for the stages'
        updates and for the bootstrapped targets; one step then equals backprop's step (the
        upper bound of a perfect synthesizer, and the library's invariant).
      boundaries: 0-based indices of the stages after which the chain is decoupled (default:
        after every stage but the last). Stages between two boundaries train by backprop among
        themselves.
      num_classes: number of label classes (for ``conditioned``).
    """
    if synthesizer is None:
        synthesizer = PAPER_CDNI_SYNTHESIZER if conditioned else PAPER_DNI_SYNTHESIZER
    if num_classes <= 0:
        raise ValueError(f"num_classes={num_classes} must be a positive integer")
    chosen = None if boundaries is None else tuple(int(b) for b in boundaries)
    if chosen is not None and list(chosen) != sorted(set(chosen)):
        raise ValueError(f"boundaries={chosen} must be distinct and increasing stage indices")
    return DNI(synthesizer, conditioned, oracle, chosen, num_classes)


__all__ = ["DNI", "Backprop", "Method", "backprop", "dense", "dni"]

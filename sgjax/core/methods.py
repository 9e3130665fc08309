"""Training methods: what each stage of a chain learns from.

* ``backprop()``: the true gradient of the loss, backpropagated through every stage.
* ``dni(...)``: decoupled boundaries after chosen stages, each with a synthesizer predicting the
  loss gradient there (Jaderberg et al. 2016); ``conditioned=True`` is cDNI;
  ``synthetic_inputs=True`` is the complete unlock (each group also trains on its input as
  predicted from the network's input).
* ``bp_lambda(lam, ...)``: BP(lambda), each group's gradient mixes the backpropagated one (weight
  lam) with the synthetic one, recursively down the chain.
* ``zero_gradient()`` and ``stale_gradient(num_examples, decay)``: the paper's baselines;
  decoupled groups get no gradient, or per training example a moving average of the true
  gradients of its earlier draws.
* ``dgl(aux)``: greedy local learning (Belilovsky et al. 2020): each decoupled group learns from
  its own auxiliary classifier; nothing crosses a boundary backwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sgjax.core.synthesizers import (
    AuxiliaryFactory,
    Dense,
    SynthesizerFactory,
    auto_auxiliary,
    dense,
)

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
    synthetic_inputs: bool = False
    """Complete unlock: groups above the first train on synthetic inputs (see ``dni``)."""
    input_units: int = 1024
    """Hidden units of each synthetic-input model."""
    backprop_weight: float | None = None
    """BP(lambda)'s lambda; None for plain DNI (see ``bp_lambda``)."""


@dataclasses.dataclass(frozen=True)
class ZeroGradient:
    """Decoupled groups get no gradient; only the last group learns (see ``zero_gradient``)."""

    boundaries: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class StaleGradient:
    """Decoupled groups get a moving average of past true gradients (see ``stale_gradient``)."""

    num_examples: int
    decay: float = 0.9
    boundaries: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DGL:
    """Greedy local learning with an auxiliary classifier per decoupled group (see ``dgl``)."""

    aux: AuxiliaryFactory
    boundaries: tuple[int, ...] | None = None
    num_classes: int = 10


Method = Backprop | DNI | ZeroGradient | StaleGradient | DGL
DECOUPLED_METHODS = (DNI, ZeroGradient, StaleGradient, DGL)


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
    synthetic_inputs: bool = False,
    input_units: int = 1024,
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
      synthetic_inputs: the complete unlock (Jaderberg et al. 2016, section 3.1): per boundary a
        synthetic-input model (one hidden layer of ``input_units``, ReLU) predicts the group
        above's input from the network's input and regresses onto the real one (L2); every group
        above the first trains on its synthetic input and its synthetic gradient. Evaluation
        (``Trainer.apply``) joins the chain normally.
      input_units: hidden units of each synthetic-input model.
    """
    if synthesizer is None:
        synthesizer = PAPER_CDNI_SYNTHESIZER if conditioned else PAPER_DNI_SYNTHESIZER
    _check_classes(num_classes)
    if input_units <= 0:
        raise ValueError(f"input_units={input_units} must be a positive integer")
    if synthetic_inputs and oracle:
        raise ValueError("oracle=True needs the true inputs; drop synthetic_inputs")
    chosen = _boundaries(boundaries)
    return DNI(synthesizer, conditioned, oracle, chosen, num_classes, synthetic_inputs, input_units)


def bp_lambda(
    lam: float,
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
) -> DNI:
    """BP(lambda): the gradient a decoupled group uses is ``lam`` times the gradient sent down
    by the group above plus ``1 - lam`` times its synthetic gradient, mixed recursively from the
    top; the synthesizer's target is what the group above sends down. ``lam=1`` is backprop's
    update (synthesizers trained on true gradients), ``lam=0`` DNI's. Not update-unlocked for
    ``lam > 0``: a group waits for the backward pass above it."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda={lam} must be between 0 and 1")
    method = dni(
        synthesizer, conditioned=conditioned, boundaries=boundaries, num_classes=num_classes
    )
    return dataclasses.replace(method, backprop_weight=float(lam))


def zero_gradient(boundaries: Sequence[int] | None = None) -> ZeroGradient:
    """Baseline: decoupled groups get a zero gradient (they keep their initial parameters; their
    BatchNorm statistics still follow the data); only the last group learns."""
    return ZeroGradient(_boundaries(boundaries))


def stale_gradient(
    num_examples: int, decay: float = 0.9, boundaries: Sequence[int] | None = None
) -> StaleGradient:
    """Baseline (Jaderberg et al. 2016): each decoupled group is updated with a stale true
    gradient: per training example, an exponential moving average (``decay``) of the true
    dLoss/dh at the group's output from the earlier steps that drew that example, never the
    current step's. The averages are a table with one row per training example
    (``num_examples``), so ``Trainer.step`` needs ``example_ids``, each batch row's index in
    the training set; an example's first draw gets a zero gradient. ``decay=0`` is the true
    gradient of the example's previous draw."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1)")
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples} must be a positive integer")
    return StaleGradient(int(num_examples), float(decay), _boundaries(boundaries))


def dgl(
    aux: AuxiliaryFactory | None = None,
    *,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
) -> DGL:
    """Greedy local learning (Belilovsky et al. 2020): each decoupled group is trained by the
    loss of its own auxiliary classifier on its output (``aux``; default: linear on flat
    activations, the DGL paper's small pooled head on (H, W, C) maps), with its own optimizer
    state; nothing crosses a boundary backwards. The last group learns from the loss."""
    _check_classes(num_classes)
    return DGL(aux or auto_auxiliary(), _boundaries(boundaries), num_classes)


def _check_classes(num_classes: int) -> None:
    if num_classes <= 0:
        raise ValueError(f"num_classes={num_classes} must be a positive integer")


def _boundaries(boundaries: Sequence[int] | None) -> tuple[int, ...] | None:
    chosen = None if boundaries is None else tuple(int(b) for b in boundaries)
    if chosen is not None and list(chosen) != sorted(set(chosen)):
        raise ValueError(f"boundaries={chosen} must be distinct and increasing stage indices")
    return chosen


__all__ = [
    "DECOUPLED_METHODS",
    "DGL",
    "DNI",
    "Backprop",
    "Method",
    "StaleGradient",
    "ZeroGradient",
    "backprop",
    "bp_lambda",
    "dense",
    "dgl",
    "dni",
    "stale_gradient",
    "zero_gradient",
]

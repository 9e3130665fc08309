"""Training methods as behaviour: what crosses a decoupled boundary, as pure functions.

A ``Method`` is a NamedTuple of pure functions, in the spirit of optax's
``GradientTransformation``. ``Trainer.step`` runs every method the same way; a method only says,
at each decoupled boundary (the output h of the group below it):

* ``init(key, h, labels) -> (params, collections)``: which state the boundary keeps (DNI's
  synthesizer, DGL's auxiliary head, the stale gradients' table, nothing);
* ``predict(params, collections, h, labels, example_ids) -> Prediction``: the boundary module's
  reading of h on the forward pass, before anything is known from above;
* ``send(prediction, message, true) -> gradient``: what the group below is updated with, given
  the message the group above sends down (its VJP at h: the true dLoss/dh for the top boundary,
  the bootstrapped target below it) and, for methods with ``true_gradients``, the true dLoss/dh;
* ``learn(prediction, message, true, example_ids) -> Learned``: what the boundary module learns
  and from what (gradients for its optimizer, its new other variables, a loss to report).

Backprop is the method with no boundaries. The built-in methods:

* ``backprop()``: the true gradient of the loss through every stage.
* ``dni(...)``: a synthesizer per boundary predicting dLoss/dh (Jaderberg et al. 2016),
  regressed onto the bootstrapped target; ``conditioned=True`` is cDNI; ``synthetic_inputs=True``
  is the complete unlock.
* ``bp_lambda(lam, ...)``: BP(lambda), the group uses lam x the message plus (1 - lam) x g.
* ``zero_gradient()`` and ``stale_gradient(num_examples, decay)``: the paper's baselines.
* ``dgl(aux)``: greedy local learning (Belilovsky et al. 2020), an auxiliary classifier per
  group; nothing crosses a boundary backwards.

A new method is one more such object, e.g. DNI whose synthetic gradient is halved::

    half = sgjax.dni(sgjax.synthesizers.dense(1, 64))._replace(
        name="dni_half", send=lambda prediction, message, true: 0.5 * prediction.gradient
    )
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgjax.core.layers import cross_entropy
from sgjax.core.synthesizers import (
    AuxiliaryFactory,
    Dense,
    SynthesizerFactory,
    auto_auxiliary,
    dense,
)


class Prediction(NamedTuple):
    """A boundary module's reading of its group's output h, made on the forward pass."""

    gradient: jax.Array
    """Its estimate of dLoss/dh: DNI's M(h), DGL's dLoss_aux/dh, the stale table's rows, 0."""
    backward: Any = None
    """What ``learn`` needs from the forward pass: DNI's VJP of M (a ``jax.tree_util.Partial``,
    so it crosses jit boundaries), DGL's head gradients and loss; None otherwise."""
    collections: Any = None
    """The module's other variables after the forward pass (BatchNorm statistics, the table)."""


class Learned(NamedTuple):
    """What a boundary module learns at one step."""

    grads: Any
    """Gradients for the boundary's optimizer; None: the boundary has no parameters."""
    collections: Any
    """Its new other variables."""
    loss: jax.Array
    """Its loss, reported per boundary as ``sg_loss``."""


Init = Callable[[jax.Array, jax.Array, jax.Array], tuple[Any, Any]]
Predict = Callable[[Any, Any, jax.Array, jax.Array, "jax.Array | None"], Prediction]
Send = Callable[[Prediction, jax.Array, "jax.Array | None"], jax.Array]
Learn = Callable[[Prediction, jax.Array, "jax.Array | None", "jax.Array | None"], Learned]


class Method(NamedTuple):
    """How a chain is decoupled; see the module docstring. Every function is pure."""

    name: str
    init: Init
    predict: Predict
    send: Send
    learn: Learn
    boundaries: tuple[int, ...] | None = None
    """0-based stages after which the chain is decoupled; None: after every stage but the last;
    (): none (backprop)."""
    true_gradients: bool = False
    """``send`` or ``learn`` read the true dLoss/dh (an extra backward pass per step)."""
    local: bool = False
    """Nothing crosses a boundary backwards: ``send`` and ``learn`` ignore the message."""
    locked: bool = False
    """Backprop's update lock: a stage updates only when every stage above ran its backward
    pass (``update_prob``)."""
    synthetic_inputs: bool = False
    """The complete unlock: groups above the first train on predicted inputs."""
    input_units: int = 1024
    """Hidden units of each synthetic-input model (complete unlock)."""
    options: tuple[tuple[str, Any], ...] = ()
    """The settings the method was built with, for descriptions and checkpoints."""


def sg_regression_loss(synthetic: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over the batch of ||g - t||^2 (summed over the rest); the target is a constant."""
    error = synthetic - jax.lax.stop_gradient(target)
    return jnp.sum(jnp.square(error)) / error.shape[0]


def _nothing(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
    del key, h, labels
    return {}, {}


def _unused(*args: Any) -> Any:
    raise AssertionError("backprop has no decoupled boundary")


def _own_prediction(prediction: Prediction, message: jax.Array, true: Any) -> jax.Array:
    del message, true
    return prediction.gradient


def backprop() -> Method:
    """Backpropagation: every stage gets the true gradient of the loss."""
    return Method("bp", _nothing, _unused, _unused, _unused, boundaries=(), locked=True)


def _apply(module: nn.Module, params: Any, collections: Any, *args: Any) -> tuple[jax.Array, Any]:
    """``module(*args, train=True)`` and its updated other variables."""
    variables = {"params": params, **collections}
    if collections:
        out, mutated = module.apply(variables, *args, train=True, mutable=list(collections))
        return out, {**collections, **mutated}
    return module.apply(variables, *args, train=True), collections


def _initialised(module: nn.Module, key: jax.Array, *args: Any) -> tuple[Any, Any]:
    variables = dict(module.init(key, *args, train=False))
    return variables.pop("params", {}), variables


def dni(
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    oracle: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
    synthetic_inputs: bool = False,
    input_units: int = 1024,
) -> Method:
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
    _check_positive(num_classes=num_classes, input_units=input_units)
    if synthetic_inputs and oracle:
        raise ValueError("oracle=True needs the true inputs; drop synthetic_inputs")

    def context(labels: jax.Array, dtype: Any) -> jax.Array | None:
        return jax.nn.one_hot(labels, num_classes, dtype=dtype) if conditioned else None

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        return _initialised(synthesizer.build(h.shape[1:]), key, h, context(labels, h.dtype))

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del example_ids
        module = synthesizer.build(h.shape[1:])
        # M's input is a constant for M: its loss must not reach the group.
        h = jax.lax.stop_gradient(h)
        g, vjp, new = jax.vjp(
            lambda p: _apply(module, p, collections, h, context(labels, h.dtype)),
            params,
            has_aux=True,
        )
        return Prediction(g, vjp, new)

    def learn(prediction: Prediction, message: jax.Array, true: Any, example_ids: Any) -> Learned:
        del true, example_ids
        error = prediction.gradient - jax.lax.stop_gradient(message)
        batch = error.shape[0]
        (grads,) = prediction.backward(2.0 * error / batch)
        return Learned(grads, prediction.collections, jnp.sum(jnp.square(error)) / batch)

    options = (("synthesizer", synthesizer), ("conditioned", conditioned), ("oracle", oracle))
    method = Method(
        "cdni" if conditioned else "sg",
        init,
        predict,
        _own_prediction,
        learn,
        boundaries=_boundaries(boundaries),
        synthetic_inputs=synthetic_inputs,
        input_units=input_units,
        options=(*options, ("num_classes", num_classes)),
    )
    return with_oracle(method) if oracle else method


def with_oracle(method: Method) -> Method:
    """``method`` whose boundaries send the true dLoss/dh instead of their prediction (so the
    bootstrapped targets are true gradients too): one step then equals backprop's for any
    chain and boundaries, the invariant that proves the plumbing."""

    def send_true(prediction: Prediction, message: jax.Array, true: Any) -> jax.Array:
        del prediction, message
        return true

    options = tuple((k, True if k == "oracle" else v) for k, v in method.options)
    return method._replace(send=send_true, true_gradients=True, options=options)


def bp_lambda(
    lam: float,
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
) -> Method:
    """BP(lambda): the gradient a decoupled group uses is ``lam`` times the gradient sent down
    by the group above plus ``1 - lam`` times its synthetic gradient, mixed recursively from the
    top; the synthesizer's target is what the group above sends down. ``lam=1`` is backprop's
    update (synthesizers trained on true gradients), ``lam=0`` DNI's. Not update-unlocked for
    ``lam > 0``: a group waits for the backward pass above it."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda={lam} must be between 0 and 1")
    lam = float(lam)
    method = dni(
        synthesizer, conditioned=conditioned, boundaries=boundaries, num_classes=num_classes
    )

    def mix(prediction: Prediction, message: jax.Array, true: Any) -> jax.Array:
        del true
        return lam * message + (1.0 - lam) * prediction.gradient

    return method._replace(name="bp_lambda", send=mix, options=(*method.options, ("lam", lam)))


def zero_gradient(boundaries: Sequence[int] | None = None) -> Method:
    """Baseline: decoupled groups get a zero gradient (they keep their initial parameters; their
    BatchNorm statistics still follow the data); only the last group learns."""

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del params, labels, example_ids
        return Prediction(jnp.zeros_like(h), None, collections)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        del message, true, example_ids
        return Learned(None, prediction.collections, jnp.zeros((), prediction.gradient.dtype))

    return Method(
        "zero_grad", _nothing, predict, _own_prediction, learn, _boundaries(boundaries), local=True
    )


def stale_gradient(
    num_examples: int, decay: float = 0.9, boundaries: Sequence[int] | None = None
) -> Method:
    """Baseline (Jaderberg et al. 2016): each decoupled group is updated with a stale true
    gradient: per training example, an exponential moving average (``decay``) of the true
    dLoss/dh at the group's output from the earlier steps that drew that example, never the
    current step's. The averages are a table with one row per training example
    (``num_examples``), so ``Trainer.step`` needs ``example_ids``, each batch row's index in
    the training set; an example's first draw gets a zero gradient. ``decay=0`` is the true
    gradient of the example's previous draw. ``sg_loss`` is the mean over the batch of
    ||g - true||^2."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1)")
    _check_positive(num_examples=num_examples)
    decay = float(decay)

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        del key, labels
        return {}, {"stale": jnp.zeros((num_examples, *h.shape[1:]), h.dtype)}

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del params, h, labels
        if example_ids is None:
            raise ValueError(
                "stale_gradient needs example_ids: each batch row's index in the training set"
            )
        return Prediction(jnp.take(collections["stale"], example_ids, axis=0), None, collections)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        del message
        # Rows repeated in a batch hold one example twice: equal g and true gradient, so the
        # scatter writes equal values.
        average = decay * prediction.gradient + (1.0 - decay) * true
        table = prediction.collections["stale"].at[example_ids].set(average)
        loss = sg_regression_loss(prediction.gradient, true)
        return Learned(None, {"stale": table}, loss)

    return Method(
        "stale_grad",
        init,
        predict,
        _own_prediction,
        learn,
        _boundaries(boundaries),
        true_gradients=True,
        options=(("num_examples", int(num_examples)), ("decay", decay)),
    )


def dgl(
    aux: AuxiliaryFactory | None = None,
    *,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> Method:
    """Greedy local learning (Belilovsky et al. 2020): each decoupled group is trained by the
    ``loss`` (default: softmax cross-entropy) of its own auxiliary classifier on its output
    (``aux``; default: linear on flat activations, the DGL paper's small pooled head on (H, W, C)
    maps), with its own optimizer state (the synthesizers' optimizer); nothing crosses a
    boundary backwards. The last group learns from the Trainer's loss."""
    _check_positive(num_classes=num_classes)
    aux = aux or auto_auxiliary()

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        del labels
        return _initialised(aux.build(h.shape[1:], num_classes), key, h)

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del example_ids
        head = aux.build(h.shape[1:], num_classes)

        def head_loss(p: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            logits, new = _apply(head, p, collections, x)
            return loss(logits, labels), new

        (value, new), (g_head, g_h) = jax.value_and_grad(head_loss, (0, 1), has_aux=True)(
            params, jax.lax.stop_gradient(h)
        )
        return Prediction(g_h, (g_head, value), new)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        del message, true, example_ids
        g_head, value = prediction.backward
        return Learned(g_head, prediction.collections, value)

    return Method(
        "dgl",
        init,
        predict,
        _own_prediction,
        learn,
        _boundaries(boundaries),
        local=True,
        options=(("aux", aux), ("num_classes", num_classes)),
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value} must be a positive integer")


def _boundaries(boundaries: Sequence[int] | None) -> tuple[int, ...] | None:
    chosen = None if boundaries is None else tuple(int(b) for b in boundaries)
    if chosen is not None and list(chosen) != sorted(set(chosen)):
        raise ValueError(f"boundaries={chosen} must be distinct and increasing stage indices")
    return chosen


PAPER_DNI_SYNTHESIZER = Dense(hidden_layers=2, units=1024)
"""DNI's synthesizer in the paper: 2 hidden layers of 1024 units."""
PAPER_CDNI_SYNTHESIZER = Dense(hidden_layers=0)
"""cDNI's synthesizer in the paper: linear."""

__all__ = [
    "Learned",
    "Method",
    "Prediction",
    "backprop",
    "bp_lambda",
    "dense",
    "dgl",
    "dni",
    "sg_regression_loss",
    "stale_gradient",
    "with_oracle",
    "zero_gradient",
]

"""Training methods as behaviour: what crosses a decoupled boundary, as pure functions.

A ``Method`` is a NamedTuple of pure functions, like optax's ``GradientTransformation``. At
each decoupled boundary (the output h of the group below it):

* ``init(key, h, labels) -> (params, collections)``: the state the boundary keeps;
* ``predict(params, collections, h, labels, example_ids) -> Prediction``: its forward reading;
* ``send(prediction, message, true) -> gradient``: what the group below is updated with, given
  the message from above (its VJP at h: dLoss/dh at the top boundary, the bootstrapped target
  below it) and, with ``true_gradients``, the true dLoss/dh;
* ``learn(prediction, message, true, example_ids) -> Learned``: what the boundary module learns.

Built in: ``backprop``, ``dni`` (cDNI, the complete unlock), ``bp_lambda``, ``dgl`` and the
baselines ``zero_gradient``, ``stale_gradient``, ``per_example_stale_gradient``. A new method is
one more such object, e.g. ``sgjax.dni()._replace(send=lambda p, m, t: 0.5 * p.gradient)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.core.layers import apply_module, cross_entropy, init_module
from sgjax.core.synthesizers import (
    AuxiliaryFactory,
    Dense,
    SynthesizerFactory,
    auto_auxiliary,
    dense,
)


class Prediction(NamedTuple):
    """A boundary module's reading of its group's output h, made on the forward pass."""

    gradient: jax.Array  # its estimate of dLoss/dh
    backward: Any = None  # what ``learn`` needs from the forward pass (DNI: M's VJP, a Partial)
    collections: Any = None  # the module's other variables after the forward pass


class Learned(NamedTuple):
    """What a boundary module learns at one step."""

    grads: Any  # for the boundary's optimizer; None: the boundary has no parameters
    collections: Any
    loss: jax.Array  # reported per boundary as ``sg_loss``


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
    boundaries: tuple[int, ...] | None = None  # None: after every stage but the last
    true_gradients: bool = False  # send or learn read the true dLoss/dh (one more backward)
    local: bool = False  # nothing crosses a boundary backwards
    locked: bool = False  # backprop's update lock (a stage waits for every stage above)
    synthetic_inputs: bool = False  # the complete unlock
    input_units: int = 1024  # hidden units of each synthetic-input model
    options: tuple[tuple[str, Any], ...] = ()  # the settings it was built with
    warmup_steps: int = 0  # steps before ``Trainer.step(..., step=t)`` sends ``send``'s output


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


def dni(
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    oracle: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
    synthetic_inputs: bool = False,
    input_units: int = 1024,
    warmup_steps: int = 0,
) -> Method:
    """Synthetic gradients (Jaderberg et al. 2016) after the 0-based stages ``boundaries``
    (default: all but the last). ``synthesizer``: the paper's by default; ``conditioned``: cDNI
    (it reads ``one_hot(label)``); ``synthetic_inputs``: the complete unlock (section 3.1), groups
    above the first train on inputs an L2 model of ``input_units`` predicts from the network's
    input; ``warmup_steps``: steps of backprop while the synthesizers fit its gradient."""
    if synthesizer is None:
        synthesizer = PAPER_CDNI_SYNTHESIZER if conditioned else PAPER_DNI_SYNTHESIZER
    _check_positive(num_classes=num_classes, input_units=input_units)
    if synthetic_inputs and (oracle or warmup_steps):
        raise ValueError("oracle=True and warmup_steps need the true inputs; drop synthetic_inputs")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps={warmup_steps} must be a non-negative integer")

    def context(labels: jax.Array, dtype: Any) -> jax.Array | None:
        return jax.nn.one_hot(labels, num_classes, dtype=dtype) if conditioned else None

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        return init_module(key, synthesizer.build(h.shape[1:]), h, context(labels, h.dtype))

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del example_ids
        module = synthesizer.build(h.shape[1:])
        # M's input is a constant for M: its loss must not reach the group.
        h = jax.lax.stop_gradient(h)
        g, vjp, new = jax.vjp(
            lambda p: apply_module(module, p, collections, h, context(labels, h.dtype), train=True),
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
        "cdni" if conditioned else "sg", init, predict, _own_prediction, learn,
        boundaries=_boundaries(boundaries), synthetic_inputs=synthetic_inputs,
        input_units=input_units, options=(*options, ("num_classes", num_classes)),
        warmup_steps=warmup_steps,
    )  # fmt: skip
    return with_oracle(method) if oracle else method


def with_oracle(method: Method) -> Method:
    """``method`` whose boundaries send the true dLoss/dh: one step then equals backprop's for
    any chain and boundaries, the invariant that proves the plumbing."""
    options = tuple((k, True if k == "oracle" else v) for k, v in method.options)
    return method._replace(send=lambda p, m, true: true, true_gradients=True, options=options)


def bp_lambda(
    lam: float,
    synthesizer: SynthesizerFactory | None = None,
    *,
    conditioned: bool = False,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
) -> Method:
    """BP(lambda): a group uses ``lam`` x the message from above plus ``1 - lam`` x its synthetic
    gradient (``lam=1``: backprop's update, ``0``: DNI's); not update-unlocked for ``lam > 0``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda={lam} must be between 0 and 1")
    lam = float(lam)
    method = dni(
        synthesizer, conditioned=conditioned, boundaries=boundaries, num_classes=num_classes
    )
    mix = lambda prediction, message, true: lam * message + (1.0 - lam) * prediction.gradient  # noqa: E731
    return method._replace(name="bp_lambda", send=mix, options=(*method.options, ("lam", lam)))


def zero_gradient(boundaries: Sequence[int] | None = None) -> Method:
    """Baseline: decoupled groups get a zero gradient; only the last group learns."""

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        return Prediction(jnp.zeros_like(h), None, collections)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        return Learned(None, prediction.collections, jnp.zeros((), prediction.gradient.dtype))

    return Method(
        "zero_grad", _nothing, predict, _own_prediction, learn, _boundaries(boundaries), local=True
    )


def stale_gradient(decay: float = 0.9, boundaries: Sequence[int] | None = None) -> Method:
    """Baseline, the paper's (arXiv v1 section 3.1): every row gets the moving average (``decay``,
    zero at first, no bias correction) of the batch mean of the true dLoss/dh over past steps.
    Into Dense->BatchNorm that mean is zero but for rounding."""
    return _stale("stale_grad", decay, boundaries, None)


def per_example_stale_gradient(
    num_examples: int, decay: float = 0.9, boundaries: Sequence[int] | None = None
) -> Method:
    """Baseline stronger than the paper's (which set it aside as stale by an epoch): per
    training example, the moving average (``decay``) of the true dLoss/dh from the earlier steps
    that drew it (a table of ``num_examples`` rows read by ``example_ids``; a first draw gets 0)."""
    _check_positive(num_examples=num_examples)
    return _stale("stale_grad_example", decay, boundaries, int(num_examples))


def _stale(name: str, decay: float, boundaries: Any, rows: int | None) -> Method:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1)")
    decay = float(decay)

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        return {}, {"stale": jnp.zeros((rows, *h.shape[1:]) if rows else h.shape[1:], h.dtype)}

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        if not rows:
            return Prediction(jnp.broadcast_to(collections["stale"], h.shape), None, collections)
        if example_ids is None:
            raise ValueError(f"{name} needs example_ids: each row's index in the training set")
        return Prediction(jnp.take(collections["stale"], example_ids, axis=0), None, collections)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        loss, table = sg_regression_loss(prediction.gradient, true), prediction.collections["stale"]
        if not rows:
            return Learned(None, {"stale": decay * table + (1.0 - decay) * true.mean(0)}, loss)
        # Rows repeated in a batch hold one example twice: equal values are scattered.
        average = decay * prediction.gradient + (1.0 - decay) * true
        return Learned(None, {"stale": table.at[example_ids].set(average)}, loss)

    options = (("num_examples", rows),) * bool(rows) + (("decay", decay),)
    return Method(
        name, init, predict, _own_prediction, learn, _boundaries(boundaries),
        true_gradients=True, options=options,
    )  # fmt: skip


def dgl(
    aux: AuxiliaryFactory | None = None,
    *,
    boundaries: Sequence[int] | None = None,
    num_classes: int = 10,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
) -> Method:
    """Greedy local learning (Belilovsky et al. 2020): each decoupled group learns from the
    ``loss`` of its own auxiliary classifier (``aux``, default ``auto_auxiliary()``)."""
    _check_positive(num_classes=num_classes)
    aux = aux or auto_auxiliary()

    def init(key: jax.Array, h: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        del labels
        return init_module(key, aux.build(h.shape[1:], num_classes), h)

    def predict(params, collections, h, labels, example_ids) -> Prediction:  # noqa: ANN001
        del example_ids
        head = aux.build(h.shape[1:], num_classes)

        def head_loss(p: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            logits, new = apply_module(head, p, collections, x, train=True)
            return loss(logits, labels), new

        (value, new), (g_head, g_h) = jax.value_and_grad(head_loss, (0, 1), has_aux=True)(
            params, jax.lax.stop_gradient(h)
        )
        return Prediction(g_h, (g_head, value), new)

    def learn(prediction: Prediction, message: Any, true: Any, example_ids: Any) -> Learned:
        del message, true, example_ids
        g_head, value = prediction.backward
        return Learned(g_head, prediction.collections, value)

    options = (("aux", aux), ("num_classes", num_classes))
    return Method(
        "dgl", init, predict, _own_prediction, learn, _boundaries(boundaries),
        local=True, options=options,
    )  # fmt: skip


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
PAPER_CDNI_SYNTHESIZER = Dense(hidden_layers=0)

__all__ = [
    "Learned", "Method", "Prediction", "backprop", "bp_lambda", "dense", "dgl", "dni",
    "per_example_stale_gradient", "sg_regression_loss", "stale_gradient", "with_oracle",
    "zero_gradient",
]  # fmt: skip

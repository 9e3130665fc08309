"""Recurrent DNI: truncated BPTT whose gradient from beyond each segment is synthetic.

Jaderberg et al. 2016, section 3.2: a core ``(carry, x) -> (carry, logits)`` is unrolled over
segments of T steps, each from the previous one's end carry. ``bptt`` (``backprop()``): the
gradient from beyond a segment's end is zero; ``dni`` (``dni(dense(1, units))``): it is
``scale * M(carry_T)`` (zero where the sequence ends), and M regresses ``M(carry_0)`` onto the
gradient reaching the segment's start (one backward pass gives both); ``dni_aux``: a head reads
the carry after the first step and predicts ``M(carry_T)``, its loss training the core too.
Losses sum over masked steps and average over the batch, so the segments' gradients add up to
the sequence's; synthesizer targets are per example, independent of the batch size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgjax.core.methods import Method
from sgjax.core.optim import apply_optimizer
from sgjax.core.synthesizers import Dense

RECURRENT_MODES = ("bptt", "dni", "dni_aux")
PAPER_SG_SCALE = 0.1  # the paper scales the synthetic gradient by 0.1 before the core

Carry = Any  # the core's state: a pytree of [batch, ...] arrays
StepLoss = Callable[[jax.Array, jax.Array], jax.Array]  # each example's loss at one step


class Segment(NamedTuple):
    """T steps of a batch: inputs, targets ``[T, batch, ...]``, mask ``[T, batch]`` (1: counts)."""

    inputs: jax.Array
    targets: jax.Array
    mask: jax.Array


class RecurrentOptions(NamedTuple):
    """How a recurrent core uses its synthetic gradients (see ``RecurrentTrainer``)."""

    synthetic: bool  # DNI, else truncated BPTT
    synthesizer_units: int | None
    sg_scale: float
    sg_trains_core: bool
    aux_weight: float  # DNI+Aux when positive
    unscaled_target: bool  # M's target from its unscaled output (the core still gets it scaled)


def recurrent_options(
    method: Method,
    *,
    sg_scale: float = PAPER_SG_SCALE,
    sg_trains_core: bool = False,
    aux_weight: float = 0.0,
    unscaled_target: bool = False,
) -> RecurrentOptions:
    """Checks a method for a recurrent core: ``backprop()`` or ``dni(dense(1, units))``."""
    synthesizer = dict(method.options).get("synthesizer")
    if method.boundaries == ():
        units = None
    elif method.name == "sg" and isinstance(synthesizer, Dense) and synthesizer.hidden_layers == 1:
        units = synthesizer.units
    else:
        raise ValueError(
            "RecurrentTrainer takes sgjax.backprop() (truncated BPTT) or "
            "sgjax.dni(sgjax.synthesizers.dense(1, units)) (unconditioned, one hidden layer); "
            f"got the method {method.name!r} with {synthesizer}"
        )
    if not (math.isfinite(sg_scale) and sg_scale > 0):
        raise ValueError(f"sg_scale={sg_scale} must be a positive number")
    if not (math.isfinite(aux_weight) and aux_weight >= 0):
        raise ValueError(f"aux_weight={aux_weight} must be 0 or more")
    synthetic = method.boundaries != ()
    if not synthetic and (sg_trains_core or aux_weight > 0 or unscaled_target):
        raise ValueError("sg_trains_core, aux_weight and unscaled_target need sgjax.dni()")
    options = (float(sg_scale), sg_trains_core, float(aux_weight), unscaled_target)
    return RecurrentOptions(synthetic, units, *options)


class CarryPredictor(nn.Module):
    """A carry-shaped prediction from a carry: ``hidden_layers`` x (Dense, ReLU), then a
    zero-initialised Dense (M has one hidden layer; the auxiliary head is linear)."""

    units: int
    hidden_layers: int

    @nn.compact
    def __call__(self, carry: Carry) -> Carry:
        x, unflatten = flatten_carry(carry)
        for _ in range(self.hidden_layers):
            x = nn.relu(nn.Dense(self.units)(x))
        zeros = nn.initializers.zeros
        return unflatten(nn.Dense(_width(carry), kernel_init=zeros)(x))


def _width(carry: Carry) -> int:
    return sum(math.prod(leaf.shape[1:]) for leaf in jax.tree_util.tree_leaves(carry))


def flatten_carry(carry: Carry) -> tuple[jax.Array, Callable[[jax.Array], Carry]]:
    """``[batch, width]`` from a carry's leaves, and the inverse."""
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    batch = leaves[0].shape[0]
    shapes = [leaf.shape[1:] for leaf in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    flat = jnp.concatenate([leaf.reshape(batch, -1) for leaf in leaves], axis=-1)

    def unflatten(x: jax.Array) -> Carry:
        parts = jnp.split(x, list(itertools.accumulate(sizes))[:-1], axis=-1)
        return jax.tree_util.tree_unflatten(
            treedef, [p.reshape(x.shape[0], *s) for p, s in zip(parts, shapes, strict=True)]
        )

    return flat, unflatten


def carry_sq_error(prediction: Carry, target: Carry) -> jax.Array:
    """Mean over the batch of the summed squared error; the target is a constant."""
    total = sum(
        jnp.sum(jnp.square(p - jax.lax.stop_gradient(t)))
        for p, t in zip(
            jax.tree_util.tree_leaves(prediction), jax.tree_util.tree_leaves(target), strict=True
        )
    )
    return total / jax.tree_util.tree_leaves(prediction)[0].shape[0]


class RecurrentState(NamedTuple):
    """The parameters (``core``; for DNI ``synthesizer``, ``aux``) and their optimizer state."""

    params: dict[str, Any]
    opt_state: optax.OptState


class SegmentGradients(NamedTuple):
    """What backpropagating one segment gives."""

    core: Any  # the core's gradient (mean over the batch)
    start_grad: Carry  # per example, at the start carry: the bootstrapped target
    end_carry: Carry
    loss_sum: jax.Array  # over the batch and the counted steps
    count: jax.Array  # counted (example, step) pairs
    outputs: jax.Array  # [T, batch, ...] logits


class SegmentMetrics(NamedTuple):
    loss_sum: jax.Array
    count: jax.Array
    sg_loss: jax.Array  # M's regression loss at the segment's start (0 for bptt)
    aux_loss: jax.Array  # 0 unless dni_aux
    outputs: jax.Array


class RecurrentTrainer:
    """Trains a recurrent ``core`` segment by segment (arguments in ``Trainer``'s order); pure.
    ``options``: see ``recurrent_options`` (``sg_trains_core`` uses ``step``'s ``previous``).
    ``unroll`` is ``lax.scan``'s (``True``: XLA's cost analysis counts every step)."""

    def __init__(
        self,
        core: nn.Module,
        method: Method,
        loss: StepLoss,
        optimizer: optax.GradientTransformation,
        *,
        unroll: int | bool = 1,
        **options: Any,
    ) -> None:
        self.core = core
        self.method = method
        self.options = recurrent_options(method, **options)
        self.loss = loss
        self.optimizer = optimizer
        self.scan_unroll = unroll

    def _predictors(self, carry: Carry) -> tuple[CarryPredictor, CarryPredictor]:
        units = self.options.synthesizer_units or max(_width(carry) // 2, 1)
        return CarryPredictor(units, 1), CarryPredictor(units, 0)

    def init(self, key: jax.Array, carry: Carry, x: jax.Array) -> RecurrentState:
        """Parameters for a carry and one step's input like ``carry`` and ``x``."""
        core_key, sg_key, aux_key = jax.random.split(key, 3)
        params: dict[str, Any] = {"core": self.core.init(core_key, carry, x)["params"]}
        if self.options.synthetic:
            synthesizer, aux = self._predictors(carry)
            params["synthesizer"] = synthesizer.init(sg_key, carry)["params"]
            if self.options.aux_weight > 0:
                params["aux"] = aux.init(aux_key, carry)["params"]
        return RecurrentState(params, self.optimizer.init(params))

    def unroll(
        self, core_params: Any, carry: Carry, segment: Segment
    ) -> tuple[tuple[jax.Array, Carry], tuple[jax.Array, jax.Array]]:
        """``((loss_sum, end_carry), (count, logits))`` over the segment."""

        def one_step(c: Carry, step: tuple[jax.Array, ...]) -> tuple[Carry, tuple]:
            x, target, mask = step
            c, logits = self.core.apply({"params": core_params}, c, x)
            return c, (jnp.sum(self.loss(logits, target) * mask), logits)

        end, (losses, logits) = jax.lax.scan(
            one_step, carry, tuple(segment), unroll=self.scan_unroll
        )
        return (jnp.sum(losses), end), (jnp.sum(segment.mask), logits)

    def segment_gradients(
        self, core_params: Any, carry: Carry, segment: Segment, end_grad: Carry
    ) -> SegmentGradients:
        """Backpropagate the segment's loss plus ``<end_grad, end_carry>`` (per example)."""
        batch = jax.tree_util.tree_leaves(carry)[0].shape[0]
        (loss_sum, end), vjp, (count, logits) = jax.vjp(
            lambda p, c: self.unroll(p, c, segment), core_params, carry, has_aux=True
        )
        core_grad, start = vjp((jnp.ones_like(loss_sum) / batch, _div(end_grad, batch)))
        return SegmentGradients(core_grad, _mul(start, batch), end, loss_sum, count, logits)

    def synthetic_gradient(self, params: dict[str, Any], carry: Carry) -> Carry:
        """M's prediction of the per-example gradient at ``carry`` (unscaled)."""
        synthesizer, _ = self._predictors(carry)
        return synthesizer.apply({"params": params["synthesizer"]}, carry)

    def step(
        self,
        state: RecurrentState,
        carry: Carry,
        segment: Segment,
        continues: jax.Array,
        previous: tuple[Carry, Segment, jax.Array] | None = None,
    ) -> tuple[RecurrentState, Carry, SegmentMetrics]:
        """One update on ``segment`` from ``carry`` (``continues[b]``: b's sequence goes on);
        ``previous = (carry, segment, present)``: the segment before, for ``sg_trains_core``."""
        method, params = self.options, state.params
        batch = jax.tree_util.tree_leaves(carry)[0].shape[0]
        grads: dict[str, Any] = {}

        (loss_sum, end), vjp, (count, logits) = jax.vjp(
            lambda p, c: self.unroll(p, c, segment), params["core"], carry, has_aux=True
        )
        ones = jnp.ones_like(loss_sum) / batch
        if method.synthetic:
            end_sg = jax.tree_util.tree_map(
                lambda x: x * continues.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype),
                self.synthetic_gradient(params, end),
            )
            # The segment is backpropagated with the scaled synthetic gradient at its end; what
            # reaches its start is M's bootstrapped target (so M learns a gradient whose part
            # from beyond each further boundary is discounted by ``sg_scale``).
            core_grad, start = vjp((ones, _div(_mul(end_sg, method.sg_scale), batch)))
            if method.unscaled_target:  # add what the rest of M's output brings to the start
                start = _add(start, vjp((0 * ones, _mul(end_sg, (1 - method.sg_scale) / batch)))[1])
        else:
            core_grad, start = vjp((ones, jax.tree_util.tree_map(jnp.zeros_like, end)))
        grads["core"] = core_grad
        sg_loss = aux_loss = jnp.zeros((), jnp.float32)

        if method.synthetic:
            target = jax.lax.stop_gradient(_mul(start, batch))
            synthesizer, aux_head = self._predictors(carry)

            def sg_objective(synth_params: Any, core_params: Any) -> jax.Array:
                at = jax.lax.stop_gradient(carry)
                if method.sg_trains_core and previous is not None:
                    prev_carry, prev_segment, present = previous
                    (_, recomputed), _ = self.unroll(core_params, prev_carry, prev_segment)
                    at = jax.tree_util.tree_map(
                        lambda x, y: jnp.where(present.reshape((-1,) + (1,) * (x.ndim - 1)), x, y),
                        recomputed,
                        at,
                    )
                prediction = synthesizer.apply({"params": synth_params}, at)
                return carry_sq_error(prediction, target)

            sg_loss, (synth_grad, core_sg_grad) = jax.value_and_grad(sg_objective, argnums=(0, 1))(
                params["synthesizer"], params["core"]
            )
            grads["synthesizer"] = synth_grad
            if method.sg_trains_core:
                grads["core"] = _add(grads["core"], core_sg_grad)

            if method.aux_weight > 0:
                aux_target = jax.lax.stop_gradient(end_sg)
                first = jax.tree_util.tree_map(lambda x: x[0], segment.inputs)

                def aux_objective(aux_params: Any, core_params: Any) -> jax.Array:
                    after_first, _ = self.core.apply({"params": core_params}, carry, first)
                    prediction = aux_head.apply({"params": aux_params}, after_first)
                    return method.aux_weight * carry_sq_error(prediction, aux_target)

                aux_loss, (aux_grad, core_aux_grad) = jax.value_and_grad(
                    aux_objective, argnums=(0, 1)
                )(params["aux"], params["core"])
                grads["aux"] = aux_grad
                grads["core"] = _add(grads["core"], core_aux_grad)

        new_params, opt_state = apply_optimizer(self.optimizer, grads, state.opt_state, params)
        metrics = SegmentMetrics(loss_sum, count, sg_loss, aux_loss, logits)
        return RecurrentState(new_params, opt_state), end, metrics


def _div(tree: Any, value: float) -> Any:
    return jax.tree_util.tree_map(lambda x: x / value, tree)


def _mul(tree: Any, value: float) -> Any:
    return jax.tree_util.tree_map(lambda x: x * value, tree)


def _add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)

"""``Trainer``: any chain of Flax modules trained by backprop or with synthetic gradients.

Notation (DESIGN.md): stages f_1..f_K; decoupled boundaries split them into groups; the group
above boundary k ends with h_k and carries the synthesizer M_k, g_k = M_k(h_k [, label]).

* every group but the last is updated with the VJP of the group at its (constant) input with the
  synthetic gradient of the boundary above it; the last group gets the true loss gradient;
* that VJP at the group's input is the message sent down: the bootstrapped target of the
  boundary below; the last group sends dLoss/dh down;
* every M_k regresses g_k onto its target (stop_gradient): mean over the batch of ||g_k - t_k||^2,
  with its own optimizer state.

Other methods (``sgjax.core.methods``) reuse the groups: BP(lambda) mixes the message from
above into the synthetic gradient; the complete unlock feeds every group a synthetic input; the
baselines (zero and stale gradient) and greedy local learning (an auxiliary classifier per group)
keep their per-boundary state where DNI keeps its synthesizers. ``step(..., key=, update_prob=)``
makes every update stochastic (``stochastic_update_mask``).

Every stage and synthesizer keeps its own optimizer state. The per-group pieces
(``group_forward``, ``group_backward``, ``last_group_gradients``, ``synthesizer_gradients``)
are public so that engines can run groups on separate devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgjax.core.methods import (
    DECOUPLED_METHODS,
    DGL,
    DNI,
    Backprop,
    Method,
    StaleGradient,
    ZeroGradient,
)
from sgjax.core.optim import apply_optimizer
from sgjax.core.synthesizers import InputModel

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

UPDATE_KEY = 0x55504450
"""Folded into step t's batch key for the stochastic updates' coins (``--update_prob``)."""


class StageState(NamedTuple):
    """A stage's (or synthesizer's) parameters, other variables and optimizer state."""

    params: Any
    collections: Any
    """Non-parameter variables, e.g. ``{"batch_stats": ...}``; ``{}`` when there are none."""
    opt_state: optax.OptState


class TrainerState(NamedTuple):
    """Everything a ``Trainer`` updates: one ``StageState`` per stage and per synthesizer."""

    stages: tuple[StageState, ...]
    synthesizers: tuple[StageState, ...]
    """One per decoupled boundary, bottom to top; empty for backprop. DNI's synthesizers; the
    stale-gradient average (``collections["stale"]``), DGL's auxiliary heads, or nothing (zero
    gradient) for the other decoupled methods."""
    inputs: tuple[StageState, ...] = ()
    """Complete unlock only: per boundary the synthetic-input model of the group above it."""


class StepMetrics(NamedTuple):
    """Per-step metrics; ``sg_loss`` has one entry per decoupled boundary (none for bp)."""

    loss: jax.Array
    accuracy: jax.Array
    sg_loss: jax.Array
    input_loss: Any = ()
    """Complete unlock: per boundary the synthetic-input model's regression loss (mean over the
    batch of the squared error summed over units); ``()`` for every other method."""


class GroupForward(NamedTuple):
    """What a decoupled group's forward pass leaves for its backward pass.

    The VJP closures are ``jax.tree_util.Partial`` pytrees, so they can cross a jit boundary.
    """

    output: jax.Array
    synthetic_grad: jax.Array
    group_vjp: Callable
    synthesizer_vjp: Callable
    collections: tuple[Any, ...]
    synthesizer_collections: Any


class GroupGradients(NamedTuple):
    """Gradients of a decoupled group (per stage) and of its synthesizer."""

    stages: tuple[Any, ...]
    synthesizer: Any
    input_grad: jax.Array | None
    """VJP at the group's input: the bootstrapped target of the boundary below (None for the
    first group)."""
    sg_loss: jax.Array


class LastGroupGradients(NamedTuple):
    """The last group's true gradients, dLoss/d(its input), the loss and the output."""

    stages: tuple[Any, ...]
    input_grad: jax.Array | None
    collections: tuple[Any, ...]
    loss: jax.Array
    output: jax.Array


class LocalGradients(NamedTuple):
    """Greedy local learning: a group's and its auxiliary head's gradients of the head's loss."""

    stages: tuple[Any, ...]
    head: Any
    collections: tuple[Any, ...]
    head_collections: Any
    loss: jax.Array


class SynthesizerGradients(NamedTuple):
    grads: Any
    sg_loss: jax.Array


def apply_module(
    module: nn.Module, params: Any, collections: Any, *args: Any, train: bool
) -> tuple[jax.Array, Any]:
    """``module(*args, train=train)``; returns the output and the (updated, if training) other
    variables. BatchNorm statistics are updated only in training and only when present."""
    variables = {"params": params, **collections}
    if train and collections:
        out, mutated = module.apply(variables, *args, train=True, mutable=list(collections))
        return out, {**collections, **mutated}
    return module.apply(variables, *args, train=train), collections


def init_module(key: jax.Array, module: nn.Module, *args: Any) -> tuple[Any, Any]:
    """Parameters and other variables of ``module`` initialised on example ``args``."""
    variables = dict(module.init(key, *args, train=False))
    params = variables.pop("params", {})
    return params, variables


def sg_regression_loss(synthetic: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over the batch of ||g - t||^2 (summed over the rest); the target is a constant."""
    error = synthetic - jax.lax.stop_gradient(target)
    return jnp.sum(jnp.square(error)) / error.shape[0]


def _zero_accuracy(output: jax.Array, labels: jax.Array) -> jax.Array:
    del output, labels
    return jnp.zeros((), jnp.float32)


class Trainer:
    """Train a chain of Flax modules with ``method`` (``backprop()`` or ``dni(...)``).

    Args:
      stages: Flax modules, each called as ``module(x, train=...)``; the last one produces the
        output that ``loss`` reads.
      method: ``sgjax.backprop()`` or ``sgjax.dni(...)``.
      loss: ``loss(output, labels) -> scalar``.
      optimizer: an optax optimizer; every stage gets its own state of it.
      synthesizer_optimizer: the synthesizers' optimizer (default: ``optimizer``).
      accuracy: optional ``accuracy(output, labels) -> scalar`` reported in the metrics.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        method: Method,
        loss: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        synthesizer_optimizer: optax.GradientTransformation | None = None,
        accuracy: LossFn | None = None,
    ) -> None:
        self.stages = tuple(stages)
        if not self.stages:
            raise ValueError("a Trainer needs at least one stage")
        if not isinstance(method, (Backprop, *DECOUPLED_METHODS)):
            raise TypeError(
                "method must be sgjax.backprop(), dni(...), bp_lambda(...), zero_gradient(), "
                f"stale_gradient(...) or dgl(...), got {method!r}"
            )
        self.method = method
        self.loss = loss
        self.optimizer = optimizer
        self.synthesizer_optimizer = synthesizer_optimizer or optimizer
        self.accuracy = accuracy or _zero_accuracy
        self.groups = self._groups()

    # ------------------------------------------------------------------ structure

    @property
    def decoupled(self) -> bool:
        return not isinstance(self.method, Backprop)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """0-based indices of the stages after which the chain is decoupled."""
        if isinstance(self.method, Backprop):
            return ()
        if self.method.boundaries is None:
            return tuple(range(len(self.stages) - 1))
        return self.method.boundaries

    def _groups(self) -> tuple[tuple[int, ...], ...]:
        last = len(self.stages) - 1
        for b in self.boundaries:
            if not 0 <= b < last:
                raise ValueError(
                    f"boundary {b} is not after a stage that has a stage above it; choose "
                    f"indices between 0 and {last - 1}"
                )
        starts = [0, *(b + 1 for b in self.boundaries)]
        ends = [*(b + 1 for b in self.boundaries), len(self.stages)]
        return tuple(tuple(range(s, e)) for s, e in zip(starts, ends, strict=True))

    def _synthesizer(self, shape: tuple[int, ...]) -> nn.Module:
        assert isinstance(self.method, DNI)
        return self.method.synthesizer.build(tuple(shape))

    def _auxiliary(self, shape: tuple[int, ...]) -> nn.Module:
        assert isinstance(self.method, DGL)
        return self.method.aux.build(tuple(shape), self.method.num_classes)

    @property
    def unlocked(self) -> bool:
        """Whether the method is the complete unlock (DNI with synthetic inputs)."""
        return isinstance(self.method, DNI) and self.method.synthetic_inputs

    def _context(self, labels: jax.Array, dtype: Any) -> jax.Array | None:
        if not (isinstance(self.method, DNI) and self.method.conditioned):
            return None
        return jax.nn.one_hot(labels, self.method.num_classes, dtype=dtype)

    # ------------------------------------------------------------------ init and apply

    def init(self, key: jax.Array, sample_x: jax.Array) -> TrainerState:
        """Initial state; ``sample_x`` is an example batch (only its shape matters).

        Stage k is initialised with ``split(key, K)[k]``, synthesizer j with
        ``split(fold_in(key, 1), J)[j]``, so backprop and DNI start from the same network.
        """
        keys = jax.random.split(key, len(self.stages))
        stages, outputs = [], []
        h = sample_x
        for module, k in zip(self.stages, keys, strict=True):
            params, collections = init_module(k, module, h)
            h = module.apply({"params": params, **collections}, h, train=False)
            outputs.append(h)
            stages.append(StageState(params, collections, self.optimizer.init(params)))
        synthesizers, inputs = [], []
        if self.boundaries:
            synth_keys = jax.random.split(jax.random.fold_in(key, 1), len(self.boundaries))
            input_keys = jax.random.split(jax.random.fold_in(key, 2), len(self.boundaries))
            for b, k, k_in in zip(self.boundaries, synth_keys, input_keys, strict=True):
                h = jnp.zeros_like(outputs[b])
                synthesizers.append(self._init_boundary(k, h))
                if self.unlocked:
                    params = self._input_model(h.shape[1:]).init(k_in, sample_x)["params"]
                    inputs.append(StageState(params, {}, self.optimizer.init(params)))
        return TrainerState(tuple(stages), tuple(synthesizers), tuple(inputs))

    def _init_boundary(self, key: jax.Array, h: jax.Array) -> StageState:
        """The state a decoupled boundary keeps: DNI's synthesizer, DGL's auxiliary head, the
        stale-gradient average, or nothing (zero gradient)."""
        if isinstance(self.method, DNI):
            context = self._context(jnp.zeros(h.shape[:1], jnp.int32), h.dtype)
            params, collections = init_module(key, self._synthesizer(h.shape[1:]), h, context)
            return StageState(params, collections, self.synthesizer_optimizer.init(params))
        if isinstance(self.method, DGL):
            params, collections = init_module(key, self._auxiliary(h.shape[1:]), h)
            return StageState(params, collections, self.optimizer.init(params))
        if isinstance(self.method, StaleGradient):
            shape = (self.method.num_examples, *h.shape[1:])
            return StageState({}, {"stale": jnp.zeros(shape, h.dtype)}, ())
        return StageState({}, {}, ())

    def apply_group(
        self,
        j: int,
        params: Sequence[Any],
        collections: Sequence[Any],
        h: jax.Array,
        train: bool,
    ) -> tuple[jax.Array, tuple[Any, ...]]:
        """Group ``j``'s output and its stages' (updated, if training) other variables."""
        new = []
        for k, p, c in zip(self.groups[j], params, collections, strict=True):
            h, c = apply_module(self.stages[k], p, c, h, train=train)
            new.append(c)
        return h, tuple(new)

    def apply(self, state: TrainerState, x: jax.Array) -> jax.Array:
        """The chain's output in evaluation mode (BatchNorm running averages)."""
        h = x
        for module, stage in zip(self.stages, state.stages, strict=True):
            h, _ = apply_module(module, stage.params, stage.collections, h, train=False)
        return h

    def evaluate(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Loss and accuracy in evaluation mode."""
        output = self.apply(state, x)
        return self.loss(output, labels), self.accuracy(output, labels)

    # ------------------------------------------------------------------ per-group pieces

    def group_state(self, stages: Sequence[StageState], j: int) -> tuple[tuple, tuple]:
        """Group ``j``'s parameters and other variables, per stage (``stages``: every stage's
        state, or a mapping from stage index to state holding at least group ``j``'s)."""
        chosen = [stages[k] for k in self.groups[j]]
        return tuple(s.params for s in chosen), tuple(s.collections for s in chosen)

    def group_forward(
        self,
        stages: Sequence[StageState],
        synthesizer: StageState,
        j: int,
        h_in: jax.Array,
        labels: jax.Array,
    ) -> GroupForward:
        """Decoupled group ``j`` (not the last): its output h and g = M(h), with their VJPs.

        ``stages`` is the whole tuple of stage states (only group ``j``'s are read).
        """
        params, collections = self.group_state(stages, j)
        if j == 0:
            output, group_vjp, new_collections = jax.vjp(
                lambda p: self.apply_group(j, p, collections, h_in, True), params, has_aux=True
            )
        else:
            output, group_vjp, new_collections = jax.vjp(
                lambda p, x: self.apply_group(j, p, collections, x, True),
                params,
                h_in,
                has_aux=True,
            )
        # M's input is a constant for M: its loss must not reach the group.
        h_const = jax.lax.stop_gradient(output)
        context = self._context(labels, output.dtype)
        module = self._synthesizer(output.shape[1:])
        synthetic, synth_vjp, synth_collections = jax.vjp(
            lambda p: apply_module(
                module, p, synthesizer.collections, h_const, context, train=True
            ),
            synthesizer.params,
            has_aux=True,
        )
        return GroupForward(
            output, synthetic, group_vjp, synth_vjp, new_collections, synth_collections
        )

    def group_backward(
        self, fwd: GroupForward, target: jax.Array, synthetic_grad: jax.Array | None = None
    ) -> GroupGradients:
        """Group gradients from g (or ``synthetic_grad``, e.g. the oracle's) and the
        synthesizer's gradient towards the constant ``target``."""
        g = fwd.synthetic_grad if synthetic_grad is None else synthetic_grad
        cotangents = fwd.group_vjp(jax.lax.stop_gradient(g))
        input_grad = cotangents[1] if len(cotangents) == 2 else None
        error = fwd.synthetic_grad - jax.lax.stop_gradient(target)
        batch = error.shape[0]
        (synth_grads,) = fwd.synthesizer_vjp(2.0 * error / batch)
        sg_loss = jnp.sum(jnp.square(error)) / batch
        return GroupGradients(cotangents[0], synth_grads, input_grad, sg_loss)

    def last_group_gradients(
        self, stages: Sequence[StageState], h_in: jax.Array, labels: jax.Array
    ) -> LastGroupGradients:
        """The last group's true gradients and dLoss/dh_in (the top boundary's target)."""
        j = len(self.groups) - 1
        params, collections = self.group_state(stages, j)

        def loss_fn(p: Any, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple]]:
            output, new = self.apply_group(j, p, collections, x, True)
            return self.loss(output, labels), (output, new)

        argnums = (0, 1) if j > 0 else (0,)
        (loss, (output, new)), grads = jax.value_and_grad(loss_fn, argnums, has_aux=True)(
            params, h_in
        )
        input_grad = grads[1] if j > 0 else None
        return LastGroupGradients(grads[0], input_grad, new, loss, output)

    def synthesizer_gradients(
        self, synthesizer: StageState, h: jax.Array, labels: jax.Array, target: jax.Array
    ) -> SynthesizerGradients:
        """M's gradient towards a constant target on a (stored) h, with M's current
        parameters: the loss is ``group_backward``'s."""
        module = self._synthesizer(h.shape[1:])
        context = self._context(labels, h.dtype)
        loss, grads = jax.value_and_grad(
            lambda p: sg_regression_loss(
                apply_module(module, p, synthesizer.collections, h, context, train=True)[0],
                target,
            )
        )(synthesizer.params)
        return SynthesizerGradients(grads, loss)

    def update_stages(
        self,
        stages: Sequence[StageState],
        indices: Sequence[int],
        grads: Sequence[Any],
        collections: Sequence[Any],
    ) -> dict[int, StageState]:
        """New states of stages ``indices`` after one optimizer step each."""
        new = {}
        for k, g, c in zip(indices, grads, collections, strict=True):
            params, opt_state = apply_optimizer(
                self.optimizer, g, stages[k].opt_state, stages[k].params
            )
            new[k] = StageState(params, c, opt_state)
        return new

    def update_synthesizer(
        self, synthesizer: StageState, grads: Any, collections: Any
    ) -> StageState:
        params, opt_state = apply_optimizer(
            self.synthesizer_optimizer, grads, synthesizer.opt_state, synthesizer.params
        )
        return StageState(params, collections, opt_state)

    # ------------------------------------------------------------------ true gradients

    def boundary_gradients(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, ...]:
        """True dLoss/dh_k at every decoupled boundary (training mode): the oracle, and the
        reference for probes such as the cosine with the synthetic gradients."""
        num_groups = len(self.groups)

        def forward(offsets: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
            h, outputs = x, []
            for j in range(num_groups):
                params, collections = self.group_state(state.stages, j)
                h, _ = self.apply_group(j, params, collections, h, True)
                if j < num_groups - 1:
                    h = h + offsets[j]
                    outputs.append(h)
            return self.loss(h, labels), outputs

        shapes = jax.eval_shape(lambda: forward([0.0] * (num_groups - 1))[1])
        zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        return tuple(jax.grad(lambda o: forward(o)[0])(zeros))

    def frozen_control(self) -> Trainer:
        """This trainer with synthesizers that never learn: every synthetic gradient stays 0,
        so decoupled stages keep their initialisation and only the last group trains. The
        control a decoupled method must beat to show that its synthetic gradients teach."""
        return Trainer(
            self.stages,
            self.method,
            self.loss,
            self.optimizer,
            synthesizer_optimizer=optax.set_to_zero(),
            accuracy=self.accuracy,
        )

    def synthetic_gradient_cosines(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> jax.Array:
        """Per decoupled boundary, the cosine between the synthetic gradient and the true
        dLoss/dh on this batch (both flattened over the batch); 0 where either is zero.

        The control that tells learning synthesizers from moving ones: 0 at initialisation,
        about 0 for random directions, 1 for the oracle."""
        true = self.boundary_gradients(state, x, labels)
        forwards, _, _, _ = self.decoupled_gradients(state, x, labels)
        cosines = []
        for fwd, t in zip(forwards, true, strict=True):
            norms = jnp.linalg.norm(fwd.synthetic_grad) * jnp.linalg.norm(t)
            safe = jnp.where(norms > 0, norms, 1.0)
            cosines.append(jnp.where(norms > 0, jnp.vdot(fwd.synthetic_grad, t) / safe, 0.0))
        return jnp.stack(cosines) if cosines else jnp.zeros((0,))

    # ------------------------------------------------------------------ steps

    def step(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        *,
        key: jax.Array | None = None,
        update_prob: float | jax.Array | None = None,
        example_ids: jax.Array | None = None,
    ) -> tuple[TrainerState, StepMetrics]:
        """One update of every stage (and synthesizer); pure, jittable, vmappable.

        ``example_ids`` (int, one per batch row: its index in the training set) is what the
        stale gradient's per-example averages are read and written by; other methods ignore it.

        With ``update_prob`` p (a float or a traced scalar; needs ``key``) the update is
        stochastic (Jaderberg et al. 2016, section 3.1): see ``stochastic_update_mask``. Stages
        (and boundary modules) that do not update keep their whole state (parameters, BatchNorm
        statistics, optimizer state). Every update reads the step's starting parameters, so the
        order in which the chosen stages update does not matter in this synchronous step. The
        arithmetic is not skipped: the masked updates are computed and discarded.
        """
        if isinstance(self.method, Backprop):
            new, metrics = self._backprop_step(state, x, labels)
        elif isinstance(self.method, DNI) and self.method.synthetic_inputs:
            new, metrics = self._unlocked_step(state, x, labels)
        elif isinstance(self.method, DNI):
            new, metrics = self._decoupled_step(state, x, labels)
        elif isinstance(self.method, DGL):
            new, metrics = self._dgl_step(state, x, labels)
        else:
            new, metrics = self._baseline_step(state, x, labels, example_ids)
        if update_prob is None:
            return new, metrics
        if key is None:
            raise ValueError("update_prob needs a key for the random updates")
        mask = self.stochastic_update_mask(key, update_prob)
        return self.masked_update(state, new, mask), metrics

    def stochastic_update_mask(self, key: jax.Array, update_prob: float | jax.Array) -> jax.Array:
        """Which stages update this step (bool, one per stage), each with probability p.

        Decoupled methods: every group (its stages, the module at its top boundary and, for the
        complete unlock, its synthetic-input model) updates with probability p, independently of
        the others. Backprop: every stage runs its backward pass with probability p and a stage
        updates only when it and every stage above it ran theirs (stage k of K updates with
        probability p^(K - k), 0-based: the backward pass stops at the first stage that skips).
        """
        if isinstance(self.method, Backprop):
            coins = jax.random.bernoulli(key, update_prob, (len(self.stages),))
            return jnp.flip(jnp.cumprod(jnp.flip(coins).astype(jnp.int32))).astype(bool)
        coins = jax.random.bernoulli(key, update_prob, (len(self.groups),))
        return jnp.concatenate([jnp.full((len(g),), coins[j]) for j, g in enumerate(self.groups)])

    def masked_update(
        self, old: TrainerState, new: TrainerState, stage_mask: jax.Array
    ) -> TrainerState:
        """``new`` where ``stage_mask`` (one bool per stage) is set, else ``old``; a boundary's
        module follows the group below it, a synthetic-input model the group above it."""

        def pick(flag: jax.Array, a: Any, b: Any) -> Any:
            return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)

        pairs = zip(new.stages, old.stages, strict=True)
        stages = tuple(pick(stage_mask[k], n, o) for k, (n, o) in enumerate(pairs))
        tops = [g[-1] for g in self.groups[:-1]]
        synthesizers = tuple(
            pick(stage_mask[k], n, o)
            for k, n, o in zip(tops, new.synthesizers, old.synthesizers, strict=True)
        )
        inputs = tuple(
            pick(stage_mask[k + 1], n, o)
            for k, n, o in zip(tops[: len(new.inputs)], new.inputs, old.inputs, strict=True)
        )
        return TrainerState(stages, synthesizers, inputs)

    def backprop_gradients(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[tuple[Any, ...], tuple[Any, ...], jax.Array, jax.Array]:
        """True gradients of every stage, new other variables, loss and output."""

        def loss_fn(params: tuple[Any, ...]) -> tuple[jax.Array, tuple]:
            h, new = x, []
            for module, p, s in zip(self.stages, params, state.stages, strict=True):
                h, c = apply_module(module, p, s.collections, h, train=True)
                new.append(c)
            return self.loss(h, labels), (h, tuple(new))

        params = tuple(s.params for s in state.stages)
        (loss, (output, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, new, loss, output

    def _backprop_step(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[TrainerState, StepMetrics]:
        grads, collections, loss, output = self.backprop_gradients(state, x, labels)
        indices = range(len(self.stages))
        new = self.update_stages(state.stages, indices, grads, collections)
        metrics = StepMetrics(
            loss, self.accuracy(output, labels), jnp.zeros((0,), jnp.asarray(loss).dtype)
        )
        return TrainerState(tuple(new[k] for k in indices), state.synthesizers), metrics

    def decoupled_gradients(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        synthetic_override: Sequence[jax.Array] | None = None,
        group_inputs: Sequence[jax.Array] | None = None,
    ) -> tuple[list[GroupForward], list[GroupGradients], LastGroupGradients, list[jax.Array]]:
        """One synchronous decoupled pass: forwards, group gradients (bottom to top), the last
        group's, and the targets. ``synthetic_override`` replaces every g_k (for the groups'
        updates and for the bootstrapped targets). ``group_inputs`` gives the input of every
        group above the first (the complete unlock's synthetic inputs) instead of the output
        of the group below. For BP(lambda) the gradient used by group j is lambda times what
        the group above sends down plus (1 - lambda) times g_j."""
        num_decoupled = len(self.groups) - 1
        forwards = []
        h = x
        for j in range(num_decoupled):
            if j > 0 and group_inputs is not None:
                h = jax.lax.stop_gradient(group_inputs[j - 1])
            fwd = self.group_forward(state.stages, state.synthesizers[j], j, h, labels)
            forwards.append(fwd)
            h = fwd.output
        if num_decoupled and group_inputs is not None:
            h = jax.lax.stop_gradient(group_inputs[-1])
        last = self.last_group_gradients(state.stages, h, labels)
        mix = self.method.backprop_weight if isinstance(self.method, DNI) else None

        grads: list[GroupGradients] = [None] * num_decoupled  # type: ignore[list-item]
        targets: list[jax.Array] = [None] * num_decoupled  # type: ignore[list-item]
        target = last.input_grad
        for j in reversed(range(num_decoupled)):
            override = None if synthetic_override is None else synthetic_override[j]
            if mix is not None:
                override = mix * target + (1.0 - mix) * forwards[j].synthetic_grad
            targets[j] = target
            grads[j] = self.group_backward(forwards[j], target, override)
            target = grads[j].input_grad
        return forwards, grads, last, targets

    def _decoupled_step(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[TrainerState, StepMetrics]:
        assert isinstance(self.method, DNI)
        override = self.boundary_gradients(state, x, labels) if self.method.oracle else None
        forwards, grads, last, _ = self.decoupled_gradients(state, x, labels, override)
        return self._apply_decoupled(state, forwards, grads, last, labels)

    # ------------------------------------------------------------------ other decoupled methods

    def synthetic_inputs(self, state: TrainerState, x: jax.Array) -> tuple[jax.Array, ...]:
        """Complete unlock: per boundary the predicted input of the group above it."""
        return tuple(
            self.predicted_input(m, x, tuple(s.shape[1:]))
            for m, s in zip(state.inputs, self.boundary_shapes(x), strict=True)
        )

    def _input_model(self, shape: tuple[int, ...]) -> nn.Module:
        assert isinstance(self.method, DNI)
        return InputModel(tuple(shape), self.method.input_units)

    def predicted_input(self, model: StageState, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """A synthetic-input model's prediction (per example of shape ``shape``) from ``x``."""
        return self._input_model(shape).apply({"params": model.params}, x)

    def input_model_update(
        self, model: StageState, x: jax.Array, target: jax.Array
    ) -> tuple[StageState, jax.Array]:
        """One optimizer step of a synthetic-input model's L2 regression (mean over the batch of
        the squared error summed over units) onto ``target``, the output of the group below on
        the same minibatch; the new state and the loss before the step."""
        module = self._input_model(tuple(target.shape[1:]))
        loss, grads = jax.value_and_grad(
            lambda p: sg_regression_loss(module.apply({"params": p}, x), target)
        )(model.params)
        params, opt_state = apply_optimizer(self.optimizer, grads, model.opt_state, model.params)
        return StageState(params, {}, opt_state), loss

    def boundary_shapes(self, x: Any) -> list[jax.ShapeDtypeStruct]:
        """Shape and dtype of every decoupled group's output (the input of the group above it)
        for a batch like ``x`` (an array or a ``jax.ShapeDtypeStruct``); nothing is computed."""

        def outputs(x: jax.Array) -> list[jax.Array]:
            stages = self.init(jax.random.PRNGKey(0), x).stages
            h, hs = x, []
            for j in range(len(self.groups) - 1):
                params, collections = self.group_state(stages, j)
                h, _ = self.apply_group(j, params, collections, h, False)
                hs.append(h)
            return hs

        return jax.eval_shape(outputs, x)

    def _unlocked_step(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        true_inputs: bool = False,
    ) -> tuple[TrainerState, StepMetrics]:
        """Complete unlock: every group above the first trains on its synthetic input (and its
        synthetic gradient); each synthetic-input model regresses (L2, mean over the batch of
        the squared error summed over units) onto the output the group below produced this step.
        ``true_inputs`` feeds the chain's own outputs instead (the step is then DNI's)."""
        predicted = None if true_inputs else self.synthetic_inputs(state, x)
        forwards, grads, last, _ = self.decoupled_gradients(
            state, x, labels, group_inputs=predicted
        )
        new_state, metrics = self._apply_decoupled(state, forwards, grads, last, labels)
        assert isinstance(self.method, DNI)
        inputs, input_losses = [], []
        for fwd, model_state in zip(forwards, state.inputs, strict=True):
            model, loss_in = self.input_model_update(model_state, x, fwd.output)
            inputs.append(model)
            input_losses.append(loss_in)
        metrics = metrics._replace(input_loss=jnp.stack(input_losses))
        return new_state._replace(inputs=tuple(inputs)), metrics

    def _apply_decoupled(
        self,
        state: TrainerState,
        forwards: Sequence[GroupForward],
        grads: Sequence[GroupGradients],
        last: LastGroupGradients,
        labels: jax.Array,
    ) -> tuple[TrainerState, StepMetrics]:
        new: dict[int, StageState] = {}
        synthesizers = []
        for j, (fwd, g) in enumerate(zip(forwards, grads, strict=True)):
            new.update(self.update_stages(state.stages, self.groups[j], g.stages, fwd.collections))
            synthesizers.append(
                self.update_synthesizer(
                    state.synthesizers[j], g.synthesizer, fwd.synthesizer_collections
                )
            )
        new.update(self.update_stages(state.stages, self.groups[-1], last.stages, last.collections))
        sg_loss = jnp.stack([g.sg_loss for g in grads]) if grads else jnp.zeros((0,))
        metrics = StepMetrics(last.loss, self.accuracy(last.output, labels), sg_loss)
        stages = tuple(new[k] for k in range(len(self.stages)))
        return TrainerState(stages, tuple(synthesizers), state.inputs), metrics

    def local_gradients(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[list[LocalGradients], LastGroupGradients]:
        """Greedy local learning: per decoupled group, the gradients of its auxiliary loss for
        its stages and its head, new other variables (stages, head) and the loss; the input of
        every group is a constant. Then the last group's true gradients."""
        results = []
        h = x
        for j in range(len(self.groups) - 1):
            local, h = self.local_group_gradients(state.stages, state.synthesizers[j], j, h, labels)
            results.append(local)
        return results, self.last_group_gradients(state.stages, jax.lax.stop_gradient(h), labels)

    def local_group_gradients(
        self,
        stages: Sequence[StageState],
        head_state: StageState,
        j: int,
        h: jax.Array,
        labels: jax.Array,
    ) -> tuple[LocalGradients, jax.Array]:
        """Greedy local learning, decoupled group ``j`` alone (its input a constant): the
        gradients of its auxiliary loss, and the group's output. ``stages`` is the whole tuple
        of stage states (only group ``j``'s are read)."""
        params, collections = self.group_state(stages, j)
        h_in = jax.lax.stop_gradient(h)

        def aux_loss(
            p: tuple[Any, ...], head: Any
        ) -> tuple[jax.Array, tuple[jax.Array, tuple, Any]]:
            out, new = self.apply_group(j, p, collections, h_in, True)
            logits, head_new = apply_module(
                self._auxiliary(out.shape[1:]), head, head_state.collections, out, train=True
            )
            return self.loss(logits, labels), (out, new, head_new)

        (loss, (out, new, head_new)), (g_stages, g_head) = jax.value_and_grad(
            aux_loss, (0, 1), has_aux=True
        )(params, head_state.params)
        return LocalGradients(g_stages, g_head, new, head_new, loss), out

    def update_head(self, head: StageState, grads: Any, collections: Any) -> StageState:
        """Greedy local learning: an auxiliary head's optimizer step (the stages' optimizer)."""
        params, opt_state = apply_optimizer(self.optimizer, grads, head.opt_state, head.params)
        return StageState(params, collections, opt_state)

    @property
    def local(self) -> bool:
        """Whether no feedback crosses a decoupled boundary backwards (greedy local learning,
        zero gradient): each decoupled group learns from what it computes itself."""
        return isinstance(self.method, (DGL, ZeroGradient))

    def group_coin(
        self, key: jax.Array, step: jax.Array, j: int, update_prob: float | jax.Array
    ) -> jax.Array:
        """Whether group ``j`` (and its boundary module) updates at step ``step`` of the
        single-device loop whose batch key is ``key``: the same draw as ``step(...,
        key=fold_in(fold_in(key, step), UPDATE_KEY), update_prob=)`` makes for it."""
        step_key = jax.random.fold_in(jax.random.fold_in(key, step), UPDATE_KEY)
        return self.stochastic_update_mask(step_key, update_prob)[self.groups[j][0]]

    def _dgl_step(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[TrainerState, StepMetrics]:
        local, last = self.local_gradients(state, x, labels)
        new: dict[int, StageState] = {}
        heads = []
        for j, (g_stages, g_head, collections, head_collections, _) in enumerate(local):
            new.update(self.update_stages(state.stages, self.groups[j], g_stages, collections))
            heads.append(self.update_head(state.synthesizers[j], g_head, head_collections))
        new.update(self.update_stages(state.stages, self.groups[-1], last.stages, last.collections))
        losses = [item[-1] for item in local]
        sg_loss = jnp.stack(losses) if losses else jnp.zeros((0,))
        metrics = StepMetrics(last.loss, self.accuracy(last.output, labels), sg_loss)
        stages = tuple(new[k] for k in range(len(self.stages)))
        return TrainerState(stages, tuple(heads), state.inputs), metrics

    def _baseline_step(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        example_ids: jax.Array | None = None,
    ) -> tuple[TrainerState, StepMetrics]:
        """Zero gradient (decoupled groups get 0) or stale gradient (each example's moving
        average of its past true boundary gradients, then the average takes in this step's
        true gradient). ``sg_loss`` is the mean over the batch of ||g - true||^2 for the stale
        gradient and 0 for the zero gradient."""
        stale = isinstance(self.method, StaleGradient)
        if stale and example_ids is None:
            raise ValueError(
                "stale_gradient needs example_ids: each batch row's index in the training set"
            )
        true = self.boundary_gradients(state, x, labels) if stale else None
        new: dict[int, StageState] = {}
        boundary_states, sg_losses = [], []
        h = x
        for j in range(len(self.groups) - 1):
            params, collections = self.group_state(state.stages, j)
            out, vjp, new_collections = jax.vjp(
                lambda p, j=j, h=h, c=collections: self.apply_group(j, p, c, h, True),
                params,
                has_aux=True,
            )
            if stale:
                assert isinstance(self.method, StaleGradient) and true is not None
                table = state.synthesizers[j].collections["stale"]
                # Rows repeated in a batch hold one example twice: equal g and true gradient,
                # so the scatter writes equal values.
                g = jnp.take(table, example_ids, axis=0)
                (grads,) = vjp(g)
                decay = self.method.decay
                updated = table.at[example_ids].set(decay * g + (1.0 - decay) * true[j])
                boundary = state.synthesizers[j]._replace(collections={"stale": updated})
                boundary_states.append(boundary)
                sg_losses.append(sg_regression_loss(g, true[j]))
            else:
                grads = jax.tree_util.tree_map(jnp.zeros_like, params)
                boundary_states.append(state.synthesizers[j])
                sg_losses.append(jnp.zeros((), out.dtype))
            new.update(self.update_stages(state.stages, self.groups[j], grads, new_collections))
            h = jax.lax.stop_gradient(out)
        last = self.last_group_gradients(state.stages, h, labels)
        new.update(self.update_stages(state.stages, self.groups[-1], last.stages, last.collections))
        sg_loss = jnp.stack(sg_losses) if sg_losses else jnp.zeros((0,))
        metrics = StepMetrics(last.loss, self.accuracy(last.output, labels), sg_loss)
        stages = tuple(new[k] for k in range(len(self.stages)))
        return TrainerState(stages, tuple(boundary_states), state.inputs), metrics

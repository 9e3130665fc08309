"""``Trainer``: any chain of Flax modules trained by backprop or with synthetic gradients.

Decoupled boundaries split stages f_1..f_K into groups; the group below boundary k ends with h_k,
read by the method's boundary module (DNI: g_k = M_k(h_k [, label])). Each group but the last is
updated with its VJP at its (constant) input of what its boundary sends (DNI: g_k); the last group
gets the true loss gradient. A group's VJP at its input is the message sent down, the target from
which the boundary below learns (DNI: M_k regresses g_k onto it). ``step`` is the algorithm on one
screen; what differs between methods is in the ``Method``. The per-group pieces are public so that
engines can run groups on separate devices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sgjax.core.layers import NNXStage, apply_module, init_module
from sgjax.core.methods import Learned, Method, Prediction, sg_regression_loss
from sgjax.core.optim import apply_optimizer
from sgjax.core.synthesizers import InputModel

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

UPDATE_KEY = 0x55504450
"""Folded into step t's batch key for the stochastic updates' coins (``--update_prob``)."""


def tree_where(flag: jax.Array, a: Any, b: Any) -> Any:
    """``a`` where ``flag`` is set, else ``b``, leaf by leaf."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(flag, x, y), a, b)


class StageState(NamedTuple):
    """A stage's (or boundary module's) parameters, other variables and optimizer state."""

    params: Any
    collections: Any  # non-parameter variables, e.g. {"batch_stats": ...}; {} when none
    opt_state: optax.OptState


class TrainerState(NamedTuple):
    """Everything a ``Trainer`` updates: one ``StageState`` per stage and per boundary."""

    stages: tuple[StageState, ...]
    synthesizers: tuple[StageState, ...]  # per decoupled boundary: what the method keeps there
    inputs: tuple[StageState, ...] = ()  # complete unlock: per boundary, a synthetic-input model


class StepMetrics(NamedTuple):
    """Per-step metrics; ``sg_loss`` has one entry per decoupled boundary (none for bp)."""

    loss: jax.Array
    accuracy: jax.Array
    sg_loss: jax.Array
    input_loss: Any = ()  # complete unlock: per boundary the synthetic-input model's loss


class GroupForward(NamedTuple):
    """What a decoupled group's forward pass leaves for its backward pass (a pytree: the VJP
    closures are ``jax.tree_util.Partial``s, so it can cross a jit boundary)."""

    output: jax.Array
    group_vjp: Callable
    collections: tuple[Any, ...]
    prediction: Prediction  # the boundary module's reading of ``output``

    @property
    def synthetic_grad(self) -> jax.Array:
        return self.prediction.gradient

    @property
    def synthesizer_collections(self) -> Any:
        return self.prediction.collections


class GroupGradients(NamedTuple):
    """Gradients of a decoupled group (per stage) and of its boundary module."""

    stages: tuple[Any, ...]
    synthesizer: Any  # None: the boundary module has no parameters
    input_grad: jax.Array | None  # the boundary below's target (None for the first group)
    sg_loss: jax.Array
    synthesizer_collections: Any = None


class LastGroupGradients(NamedTuple):
    """The last group's true gradients, dLoss/d(its input), the loss and the output."""

    stages: tuple[Any, ...]
    input_grad: jax.Array | None
    collections: tuple[Any, ...]
    loss: jax.Array
    output: jax.Array


class StepGradients(NamedTuple):
    """One synchronous pass of ``Trainer.gradients``, bottom to top."""

    forwards: list[GroupForward]
    groups: list[GroupGradients]
    last: LastGroupGradients
    messages: list[jax.Array]  # what each boundary received from the group above


class Trainer:
    """Train a chain of Flax modules (Linen ones called as ``module(x, train=...)``, NNX ones
    as ``NNXStage``s) with a ``sgjax.Method``; ``loss(output, labels)`` and optional
    ``accuracy(output, labels)`` read the last stage's output; every stage gets its own state of
    ``optimizer``, every boundary module of ``synthesizer_optimizer`` (default: ``optimizer``)."""

    def __init__(
        self,
        stages: Sequence[Any],
        method: Method,
        loss: LossFn,
        optimizer: optax.GradientTransformation,
        *,
        synthesizer_optimizer: optax.GradientTransformation | None = None,
        accuracy: LossFn | None = None,
    ) -> None:
        self.stages = tuple(
            s if isinstance(s, nn.Module | NNXStage) else NNXStage(s) for s in stages
        )
        if not self.stages:
            raise ValueError("a Trainer needs at least one stage")
        if not all(callable(getattr(method, f, None)) for f in ("init", "predict", "learn")):
            raise TypeError(
                "method must be a sgjax.Method such as sgjax.backprop(), dni(...), "
                f"bp_lambda(...), zero_gradient(), stale_gradient(...) or dgl(...), got {method!r}"
            )
        self.method, self.loss, self.optimizer = method, loss, optimizer
        self.synthesizer_optimizer = synthesizer_optimizer or optimizer
        self.accuracy = accuracy or (lambda output, labels: jnp.zeros((), jnp.float32))
        last = len(self.stages) - 1
        for b in self.boundaries:
            if not 0 <= b < last:
                raise ValueError(
                    f"boundary {b} is not after a stage that has a stage above it; choose "
                    f"indices between 0 and {last - 1}"
                )
        starts = [0, *(b + 1 for b in self.boundaries)]
        ends = [*(b + 1 for b in self.boundaries), len(self.stages)]
        self.groups = tuple(tuple(range(s, e)) for s, e in zip(starts, ends, strict=True))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """0-based indices of the stages after which the chain is decoupled."""
        if self.method.boundaries is None:
            return tuple(range(len(self.stages) - 1))
        return self.method.boundaries

    @property
    def decoupled(self) -> bool:
        return bool(self.boundaries)

    @property
    def unlocked(self) -> bool:
        """The complete unlock: groups train on synthetic inputs."""
        return self.method.synthetic_inputs

    @property
    def local(self) -> bool:
        """No feedback crosses a decoupled boundary backwards (DGL, zero gradient)."""
        return self.method.local

    def init(self, key: jax.Array, sample_x: jax.Array) -> TrainerState:
        """Initial state for batches like ``sample_x`` (stage k from ``split(key, K)[k]``)."""
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
                params, collections = self.method.init(k, h, jnp.zeros(h.shape[:1], jnp.int32))
                has_params = bool(jax.tree_util.tree_leaves(params))
                opt_state = self.synthesizer_optimizer.init(params) if has_params else ()
                synthesizers.append(StageState(params, collections, opt_state))
                if self.unlocked:
                    params = self._input_model(h.shape[1:]).init(k_in, sample_x)["params"]
                    inputs.append(StageState(params, {}, self.optimizer.init(params)))
        return TrainerState(tuple(stages), tuple(synthesizers), tuple(inputs))

    def apply_group(
        self, j: int, params: Sequence[Any], collections: Sequence[Any], h: jax.Array, train: bool
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

    def step(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        *,
        key: jax.Array | None = None,
        update_prob: float | jax.Array | None = None,
        example_ids: jax.Array | None = None,
        step: jax.Array | int | None = None,
    ) -> tuple[TrainerState, StepMetrics]:
        """One update of every stage and boundary module; pure, jittable, vmappable. ``example_ids``
        (rows' indices in the training set) feed the stale-gradient table; ``update_prob`` (with
        ``key``): stochastic updates; ``step`` (may be traced): the index, for ``warmup_steps``."""
        if self.method.warmup_steps and step is None:
            raise ValueError("the method warms up: pass step=<the update's index> to Trainer.step")
        inputs = self.synthetic_inputs(state, x) if self.unlocked else None
        grads = self.gradients(state, x, labels, None, inputs, example_ids, step)
        last = grads.last
        new = self.update_stages(state.stages, self.groups[-1], last.stages, last.collections)
        boundaries = []
        for j, (fwd, g) in enumerate(zip(grads.forwards, grads.groups, strict=True)):
            new.update(self.update_stages(state.stages, self.groups[j], g.stages, fwd.collections))
            sg = state.synthesizers[j]
            boundaries.append(self.update_synthesizer(sg, g.synthesizer, g.synthesizer_collections))
        sg_loss = [g.sg_loss for g in grads.groups]
        metrics = StepMetrics(
            last.loss,
            self.accuracy(last.output, labels),
            jnp.stack(sg_loss) if sg_loss else jnp.zeros((0,), jnp.asarray(last.loss).dtype),
        )
        new_state = TrainerState(
            tuple(new[k] for k in range(len(self.stages))), tuple(boundaries), state.inputs
        )
        if inputs is not None:
            # Each synthetic-input model regresses onto what the group below produced.
            fitted = [
                self.input_model_update(model, x, fwd.output)
                for model, fwd in zip(state.inputs, grads.forwards, strict=True)
            ]
            new_state = new_state._replace(inputs=tuple(model for model, _ in fitted))
            metrics = metrics._replace(input_loss=jnp.stack([loss for _, loss in fitted]))
        if update_prob is None:
            return new_state, metrics
        if key is None:
            raise ValueError("update_prob needs a key for the random updates")
        mask = self.stochastic_update_mask(key, update_prob)
        return self.masked_update(state, new_state, mask), metrics

    def gradients(
        self,
        state: TrainerState,
        x: jax.Array,
        labels: jax.Array,
        synthetic_override: Sequence[jax.Array] | None = None,
        group_inputs: Sequence[jax.Array] | None = None,
        example_ids: jax.Array | None = None,
        step: jax.Array | int | None = None,
    ) -> StepGradients:
        """Every gradient of one synchronous step: forwards bottom to top, then backwards.
        ``synthetic_override`` replaces what every boundary sends; ``group_inputs`` the input of
        every group above the first. Before ``warmup_steps`` boundaries send the message."""
        warmup = 0 if step is None else self.method.warmup_steps
        true = self.boundary_gradients(state, x, labels) if self.method.true_gradients else None
        forwards, h = [], x
        for j in range(len(self.groups) - 1):
            h = group_inputs[j - 1] if group_inputs is not None and j > 0 else h
            fwd = self.group_forward(state.stages, state.synthesizers[j], j, h, labels, example_ids)
            forwards.append(fwd)
            h = fwd.output
        if group_inputs is not None and forwards:
            h = group_inputs[-1]
        last = self.last_group_gradients(state.stages, h, labels)
        groups: list[GroupGradients] = [None] * len(forwards)  # type: ignore[list-item]
        messages: list[jax.Array] = [None] * len(forwards)  # type: ignore[list-item]
        message = last.input_grad
        for j in reversed(range(len(forwards))):
            override = None if synthetic_override is None else synthetic_override[j]
            truth = None if true is None else true[j]
            if warmup and override is None:
                sent = self.method.send(forwards[j].prediction, message, truth)
                override = jnp.where(step < warmup, message, sent)
            messages[j] = message
            groups[j] = self.group_backward(forwards[j], message, override, truth, example_ids)
            message = groups[j].input_grad
        return StepGradients(forwards, groups, last, messages)

    def stochastic_update_mask(self, key: jax.Array, update_prob: float | jax.Array) -> jax.Array:
        """Which stages update this step (bool per stage). Decoupled: each group independently
        with probability p. Locked (backprop): a stage updates only when it and every stage above
        it ran their backward pass (each with probability p), so stage k with p^(K - k)."""
        if self.method.locked:
            coins = jax.random.bernoulli(key, update_prob, (len(self.stages),))
            return jnp.flip(jnp.cumprod(jnp.flip(coins).astype(jnp.int32))).astype(bool)
        coins = jax.random.bernoulli(key, update_prob, (len(self.groups),))
        return jnp.concatenate([jnp.full((len(g),), coins[j]) for j, g in enumerate(self.groups)])

    def masked_update(
        self, old: TrainerState, new: TrainerState, stage_mask: jax.Array
    ) -> TrainerState:
        """``new`` where ``stage_mask`` is set, else ``old`` (boundaries: the group below's)."""
        pairs = zip(new.stages, old.stages, strict=True)
        stages = tuple(tree_where(stage_mask[k], n, o) for k, (n, o) in enumerate(pairs))
        tops = [g[-1] for g in self.groups[:-1]]
        synthesizers = tuple(
            tree_where(stage_mask[k], n, o)
            for k, n, o in zip(tops, new.synthesizers, old.synthesizers, strict=True)
        )
        inputs = tuple(
            tree_where(stage_mask[k + 1], n, o)
            for k, n, o in zip(tops[: len(new.inputs)], new.inputs, old.inputs, strict=True)
        )
        return TrainerState(stages, synthesizers, inputs)

    def group_coin(
        self, key: jax.Array, step: jax.Array, j: int, update_prob: float | jax.Array
    ) -> jax.Array:
        """Whether group ``j`` updates at step ``step`` of the single-device loop with batch
        key ``key`` (the draw ``step`` makes with ``fold_in(fold_in(key, step), UPDATE_KEY)``)."""
        step_key = jax.random.fold_in(jax.random.fold_in(key, step), UPDATE_KEY)
        return self.stochastic_update_mask(step_key, update_prob)[self.groups[j][0]]

    def group_state(self, stages: Sequence[StageState], j: int) -> tuple[tuple, tuple]:
        """Group ``j``'s parameters and other variables (``stages``: a sequence or mapping)."""
        chosen = [stages[k] for k in self.groups[j]]
        return tuple(s.params for s in chosen), tuple(s.collections for s in chosen)

    def group_forward(
        self,
        stages: Sequence[StageState],
        synthesizer: StageState,
        j: int,
        h_in: jax.Array,
        labels: jax.Array,
        example_ids: jax.Array | None = None,
    ) -> GroupForward:
        """Decoupled group ``j`` on a constant input: its output h, VJP and boundary's reading."""
        params, collections = self.group_state(stages, j)
        apply = lambda p, x=h_in: self.apply_group(j, p, collections, x, True)  # noqa: E731
        args = (params,) if j == 0 else (params, h_in)  # the first group's input is the data
        output, group_vjp, new_collections = jax.vjp(apply, *args, has_aux=True)
        prediction = self.method.predict(
            synthesizer.params, synthesizer.collections, output, labels, example_ids
        )
        return GroupForward(output, group_vjp, new_collections, prediction)

    def group_backward(
        self,
        fwd: GroupForward,
        target: jax.Array | None,
        synthetic_grad: jax.Array | None = None,
        true: jax.Array | None = None,
        example_ids: jax.Array | None = None,
    ) -> GroupGradients:
        """Group gradients from what its boundary sends (or ``synthetic_grad``), learning."""
        if synthetic_grad is None:
            synthetic_grad = self.method.send(fwd.prediction, target, true)
        cotangents = fwd.group_vjp(jax.lax.stop_gradient(synthetic_grad))
        input_grad = cotangents[1] if len(cotangents) == 2 else None
        learned = self.method.learn(fwd.prediction, target, true, example_ids)
        return GroupGradients(
            cotangents[0], learned.grads, input_grad, learned.loss, learned.collections
        )

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
    ) -> Learned:
        """The boundary module's learning towards a constant target on a (stored) h."""
        s = synthesizer
        return self.method.learn(
            self.method.predict(s.params, s.collections, h, labels, None), target, None, None
        )

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
            s = stages[k]
            params, opt_state = apply_optimizer(self.optimizer, g, s.opt_state, s.params)
            new[k] = StageState(params, c, opt_state)
        return new

    def update_synthesizer(
        self, synthesizer: StageState, grads: Any, collections: Any
    ) -> StageState:
        """A boundary module's optimizer step (none when ``grads`` is None)."""
        if grads is None:
            return synthesizer._replace(collections=collections)
        params, opt_state = apply_optimizer(
            self.synthesizer_optimizer, grads, synthesizer.opt_state, synthesizer.params
        )
        return StageState(params, collections, opt_state)

    def synthetic_inputs(self, state: TrainerState, x: jax.Array) -> tuple[jax.Array, ...]:
        """Complete unlock: per boundary the predicted input of the group above it."""
        return tuple(
            self.predicted_input(m, x, tuple(s.shape[1:]))
            for m, s in zip(state.inputs, self.boundary_shapes(x), strict=True)
        )

    def _input_model(self, shape: tuple[int, ...]) -> nn.Module:
        return InputModel(tuple(shape), self.method.input_units)

    def predicted_input(self, model: StageState, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """A synthetic-input model's prediction (per example of shape ``shape``) from ``x``."""
        return self._input_model(shape).apply({"params": model.params}, x)

    def input_model_update(
        self, model: StageState, x: jax.Array, target: jax.Array
    ) -> tuple[StageState, jax.Array]:
        """One step of a synthetic-input model's L2 regression on ``target``; state, loss."""
        module = self._input_model(tuple(target.shape[1:]))
        loss, grads = jax.value_and_grad(
            lambda p: sg_regression_loss(module.apply({"params": p}, x), target)
        )(model.params)
        params, opt_state = apply_optimizer(self.optimizer, grads, model.opt_state, model.params)
        return StageState(params, {}, opt_state), loss

    def boundary_shapes(self, x: Any) -> list[jax.ShapeDtypeStruct]:
        """Shape and dtype of every decoupled group's output for a batch like ``x``."""

        def outputs(x: jax.Array) -> list[jax.Array]:
            stages = self.init(jax.random.PRNGKey(0), x).stages
            h, hs = x, []
            for j in range(len(self.groups) - 1):
                params, collections = self.group_state(stages, j)
                h, _ = self.apply_group(j, params, collections, h, False)
                hs.append(h)
            return hs

        return jax.eval_shape(outputs, x)

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

    def boundary_gradients(
        self, state: TrainerState, x: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, ...]:
        """True dLoss/dh_k at every decoupled boundary (training mode)."""
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
        """This trainer with boundary modules that never learn (synthetic gradients stay 0):
        the control a decoupled method must beat to show that its synthetic gradients teach."""
        frozen = copy.copy(self)
        frozen.synthesizer_optimizer = optax.set_to_zero()
        return frozen

    def synthetic_gradient_cosines(
        self, state: TrainerState, x: jax.Array, labels: jax.Array, example_ids: Any = None
    ) -> jax.Array:
        """Per boundary, the cosine of the prediction with the true dLoss/dh (0 if either is 0)."""
        true = self.boundary_gradients(state, x, labels)
        forwards = self.gradients(state, x, labels, example_ids=example_ids).forwards
        cosines = []
        for fwd, t in zip(forwards, true, strict=True):
            norms = jnp.linalg.norm(fwd.synthetic_grad) * jnp.linalg.norm(t)
            safe = jnp.where(norms > 0, norms, 1.0)
            cosines.append(jnp.where(norms > 0, jnp.vdot(fwd.synthetic_grad, t) / safe, 0.0))
        return jnp.stack(cosines) if cosines else jnp.zeros((0,))

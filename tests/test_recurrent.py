"""Recurrent DNI's plumbing: segments with true boundary gradients add up to full BPTT; zero
synthesizers make the first DNI update the BPTT update; the synthesizer learns the gradient."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgjax.core import synthesizers
from sgjax.core.methods import backprop, dni
from sgjax.core.optim import apply_optimizer
from sgjax.core.recurrent import RecurrentTrainer, Segment, carry_sq_error
from sgjax.models.lstm import LSTMCore, zero_carry
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.programs import CopyProgram
from sgjax.tasks.copy import CopyTask, Level, sigmoid_loss

BATCH, UNITS, T = 4, 12, 3
TASK = CopyTask("repeat_copy", 24, bits=3)
LEVEL = Level(jnp.int32(2), jnp.int32(2))  # 2 + 2 + 4 + 1 = 9 steps: 3 segments of 3


def _trainer(mode: str, optimizer=None, **kwargs) -> RecurrentTrainer:
    method = backprop() if mode == "bptt" else dni(synthesizers.dense(1, UNITS))
    aux_weight = 1.0 if mode == "dni_aux" else 0.0
    return RecurrentTrainer(
        LSTMCore(UNITS, TASK.output_dim),
        method,
        sigmoid_loss,
        optimizer or optax.adam(1e-2),
        aux_weight=aux_weight,
        **kwargs,
    )


LR = 0.5
"""Plain SGD in the reference checks: an update is then -LR x the gradient."""


def _sgd_step(params, grads):
    return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)


def _max_gap(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _episode_segments():
    episode = TASK.generate(jax.random.PRNGKey(0), LEVEL, BATCH)
    length = int(episode.length)
    assert length % T == 0
    return [
        Segment(episode.inputs[t : t + T], episode.targets[t : t + T], episode.mask[t : t + T])
        for t in range(0, length, T)
    ]


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def test_segments_with_true_boundary_gradients_sum_to_full_bptt():
    trainer = _trainer("dni")
    segments = _episode_segments()
    carry0 = zero_carry(BATCH, UNITS)
    params = trainer.init(jax.random.PRNGKey(1), carry0, segments[0].inputs[0]).params["core"]
    zero = jax.tree_util.tree_map(jnp.zeros_like, carry0)

    @jax.jit
    def gradients(params):
        def episode_loss(params, nudges):
            # Full BPTT over the episode; ``nudges[k]`` is added to the state at boundary k + 1,
            # so the gradient with respect to it is the true gradient there (per example: the
            # loss is summed over the batch).
            carry, total = carry0, 0.0
            for k, segment in enumerate(segments):
                (loss, carry), _ = trainer.unroll(params, carry, segment)
                total = total + loss
                if k < len(segments) - 1:
                    carry = jax.tree_util.tree_map(jnp.add, carry, nudges[k])
            return total

        nudges = [zero] * (len(segments) - 1)
        full, true_ends = jax.grad(episode_loss, argnums=(0, 1))(params, nudges)
        full = jax.tree_util.tree_map(lambda g: g / BATCH, full)  # the segments' batch mean
        starts = [carry0]
        for segment in segments[:-1]:
            (_, end), _ = trainer.unroll(params, starts[-1], segment)
            starts.append(end)
        oracle_sum = bptt_sum = None
        start_grads = []
        for k, segment in enumerate(segments):
            true_end = true_ends[k] if k < len(true_ends) else zero
            oracle = trainer.segment_gradients(params, starts[k], segment, true_end)
            truncated = trainer.segment_gradients(params, starts[k], segment, zero)
            start_grads.append(oracle.start_grad)
            oracle_sum = oracle.core if oracle_sum is None else _add(oracle_sum, oracle.core)
            bptt_sum = truncated.core if bptt_sum is None else _add(bptt_sum, truncated.core)
        return full, oracle_sum, bptt_sum, start_grads[1:], true_ends

    full, oracle_sum, bptt_sum, start_grads, true_ends = gradients(params)
    for got, want in zip(_leaves(oracle_sum), _leaves(full), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The start gradient is the true gradient there too: the bootstrapped target is exact.
    for got, want in zip(_leaves(start_grads), _leaves(true_ends), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Truncated BPTT's sum is a different gradient (the control).
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(_leaves(bptt_sum), _leaves(full), strict=True)
    )
    assert gap > 1e-2


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def test_zero_initialised_modules_make_the_first_update_the_bptt_update():
    segment = _episode_segments()[1]  # mid-episode, with outputs and a boundary after it
    carry = jax.tree_util.tree_map(lambda x: x + 0.3, zero_carry(BATCH, UNITS))
    continues = jnp.ones((BATCH,))
    modes = ("bptt", "dni", "dni_aux")
    trainers = {mode: _trainer(mode) for mode in modes}
    states = {
        m: t.init(jax.random.PRNGKey(1), carry, segment.inputs[0]) for m, t in trainers.items()
    }

    def two_updates(state, trainer):
        first, _, metrics = trainer.step(state, carry, segment, continues)
        second, _, _ = trainer.step(first, carry, segment, continues)
        return first, second, metrics.sg_loss

    # The three modes' updates compiled as one program.
    results = jax.jit(lambda states: {m: two_updates(states[m], trainers[m]) for m in modes})(
        states
    )
    firsts = {}
    for mode, (first, _, sg_loss) in results.items():
        firsts[mode] = first.params["core"]
        if mode != "bptt":
            assert float(sg_loss) > 0  # the synthesizer did learn from this update
    for mode in ("dni", "dni_aux"):
        # Equal up to float rounding: the zero synthetic gradient adds nothing.
        for got, want in zip(_leaves(firsts[mode]), _leaves(firsts["bptt"]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_dni_update_backpropagates_the_scaled_synthetic_gradient_from_the_segment_end():
    """Against a reference built from the (separately tested) segment gradients: the second
    update is the segment's gradient with 0.1 x M(end carry) at its end, M after one update.
    Control: the same reference without the synthetic term (BPTT's update) is far from it."""
    segment = _episode_segments()[1]
    carry = jax.tree_util.tree_map(lambda x: x + 0.3, zero_carry(BATCH, UNITS))
    continues = jnp.ones((BATCH,))
    trainer = _trainer("dni", optax.sgd(LR))
    state = trainer.init(jax.random.PRNGKey(1), carry, segment.inputs[0])
    step = jax.jit(trainer.step)
    first, _, _ = step(state, carry, segment, continues)
    second, _, _ = step(first, carry, segment, continues)

    @jax.jit  # the reference and its control as one program (faster than op by op)
    def references(first):
        core = first.params["core"]
        (_, end), _ = trainer.unroll(core, carry, segment)
        synthetic = jax.tree_util.tree_map(
            lambda g: 0.1 * g, trainer.synthetic_gradient(first.params, end)
        )
        zero = jax.tree_util.tree_map(jnp.zeros_like, end)
        expected = _sgd_step(core, trainer.segment_gradients(core, carry, segment, synthetic).core)
        return expected, _sgd_step(core, trainer.segment_gradients(core, carry, segment, zero).core)

    expected, bptt = references(first)
    for got, want in zip(_leaves(second.params["core"]), _leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert _max_gap(expected, bptt) > 1e-4


def test_the_synthesizer_learns_the_true_gradient_of_a_fixed_core():
    """With the core held fixed, M's prediction at a boundary aligns with the true gradient
    from the rest of the episode (cosine); an untrained M's is zero."""
    trainer = _trainer("dni")
    segments = _episode_segments()
    carry0 = zero_carry(BATCH, UNITS)
    state = trainer.init(jax.random.PRNGKey(1), carry0, segments[0].inputs[0])
    core = state.params["core"]

    @jax.jit
    def episode_updates(state, _):
        carry = carry0
        for k, segment in enumerate(segments):
            continues = jnp.full((BATCH,), k + 1 < len(segments))
            state, carry, _ = trainer.step(state, carry, segment, continues)
            state = state._replace(params={**state.params, "core": core})
        return state, None

    def cosine(params):
        (_, boundary), _ = trainer.unroll(core, carry0, segments[0])

        def rest(carry):
            total = 0.0
            for segment in segments[1:]:
                (loss, carry), _ = trainer.unroll(core, carry, segment)
                total = total + loss
            return total

        true = jnp.concatenate([x.ravel() for x in _leaves(jax.grad(rest)(boundary))])
        synthetic = jnp.concatenate(
            [x.ravel() for x in _leaves(trainer.synthetic_gradient(params, boundary))]
        )
        norm = jnp.linalg.norm(true) * jnp.linalg.norm(synthetic)
        return float(jnp.where(norm > 0, true @ synthetic / norm, 0.0))

    assert cosine(state.params) == 0.0
    state, _ = jax.lax.scan(episode_updates, state, None, length=300)
    assert cosine(state.params) > 0.5


def test_sg_trains_core_backpropagates_the_synthesizer_loss_into_the_core():
    """Against a reference: with ``sg_trains_core`` the core's gradient gains the gradient of
    M's regression loss at the start carry recomputed through the previous segment. Control:
    the update without that term (``sg_trains_core=False``) is far from it."""
    segments = _episode_segments()
    carry0 = zero_carry(BATCH, UNITS)
    continues = jnp.ones((BATCH,))
    previous = (carry0, segments[0], jnp.ones((BATCH,), bool))
    results = {}
    for trains_core in (False, True):
        trainer = _trainer("dni", optax.sgd(LR), sg_trains_core=trains_core)
        state = trainer.init(jax.random.PRNGKey(1), carry0, segments[0].inputs[0])
        (_, start), _ = trainer.unroll(state.params["core"], carry0, segments[0])
        # Two updates: the first makes M non-zero, the second's M loss reaches the core.
        first, _, _ = trainer.step(state, start, segments[1], continues, previous)
        second, _, _ = trainer.step(first, start, segments[1], continues, previous)
        results[trains_core] = second.params["core"]

    core = first.params["core"]
    (_, end), _ = trainer.unroll(core, start, segments[1])
    synthetic = jax.tree_util.tree_map(
        lambda g: 0.1 * g, trainer.synthetic_gradient(first.params, end)
    )
    segment_grads = trainer.segment_gradients(core, start, segments[1], synthetic)
    target = segment_grads.start_grad

    def synthesizer_loss(core_params):
        (_, recomputed), _ = trainer.unroll(core_params, carry0, segments[0])
        return carry_sq_error(trainer.synthetic_gradient(first.params, recomputed), target)

    through_core = jax.grad(synthesizer_loss)(core)
    total = jax.tree_util.tree_map(jnp.add, segment_grads.core, through_core)
    expected = _sgd_step(core, total)
    for got, want in zip(_leaves(results[True]), _leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert _max_gap(results[False], expected) > 1e-4


def test_unscaled_target_regresses_m_onto_what_its_unscaled_output_brings_to_the_start():
    """Against a reference: with ``unscaled_target`` M's second update regresses onto the start
    gradient of the segment backpropagated with M(end carry) unscaled, while the core's update
    stays the scaled one. Control: the default (scaled) target's M update is far from it."""
    segment = _episode_segments()[1]
    carry = jax.tree_util.tree_map(lambda x: x + 0.3, zero_carry(BATCH, UNITS))
    continues = jnp.ones((BATCH,))
    trainers = {u: _trainer("dni", optax.sgd(LR), unscaled_target=u) for u in (False, True)}

    @jax.jit  # both trainers' two updates as one program
    def two_updates(states):
        firsts = {u: trainers[u].step(states[u], carry, segment, continues)[0] for u in states}
        return firsts, {
            u: trainers[u].step(firsts[u], carry, segment, continues)[0] for u in states
        }

    states = {
        u: t.init(jax.random.PRNGKey(1), carry, segment.inputs[0]) for u, t in trainers.items()
    }
    firsts, seconds = two_updates(states)
    trainer, first = trainers[True], firsts[True]

    core = first.params["core"]
    (_, end), _ = trainer.unroll(core, carry, segment)
    full = trainer.synthetic_gradient(first.params, end)
    target = trainer.segment_gradients(core, carry, segment, full).start_grad

    def m_loss(m):
        return carry_sq_error(trainer.synthetic_gradient({"synthesizer": m}, carry), target)

    m = first.params["synthesizer"]
    expected = _sgd_step(m, jax.grad(m_loss)(m))
    got = seconds[True].params
    for a, b in zip(_leaves(got["synthesizer"]), _leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert _max_gap(seconds[False].params["synthesizer"], expected) > 1e-4
    for a, b in zip(_leaves(got["core"]), _leaves(seconds[False].params["core"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_config_gives_m_its_own_clipped_adam_and_the_lstm_a_forget_bias():
    """``synthesizer_learning_rate`` and ``clip_norm``: two updates with gradients of norms above
    the clip equal, per group, Adam (core 1e-3, M 1e-5) on the gradient clipped to 0.5; Adam
    without the clip is far. ``forget_bias``: only the forget gate's bias starts at 1; without
    it the initial parameters are the trainer's."""
    base = RNNConfig(task="copy", mode="dni", hidden_units=UNITS, batch_size=BATCH, bits=2,
                     max_length=12, truncation=T, learning_rate=1e-3)  # fmt: skip
    config = dataclasses.replace(base, synthesizer_learning_rate=1e-5, clip_norm=0.5)
    program = CopyProgram(config)
    biased_program = CopyProgram(dataclasses.replace(base, forget_bias=1.0))
    plain = CopyProgram(base)
    carry = zero_carry(BATCH, UNITS)
    x = jnp.zeros((BATCH, plain.task.input_dim))

    @jax.jit  # every initialisation as one program (faster than op by op)
    def inits(seed):
        untouched = plain.trainer.init(jax.random.split(jax.random.PRNGKey(seed))[0], carry, x)
        return (
            program.init(seed).model.params,
            biased_program.init(seed).model.params["core"],
            plain.init(seed).model.params,
            untouched.params,
        )

    params, biased, plain_params, untouched = inits(0)
    grads = [jax.tree_util.tree_map(lambda x, k=k: jnp.full_like(x, k), params) for k in (3, 7)]

    def two_updates(optimizer, params):
        opt_state = optimizer.init(params)
        for g in grads:
            g = {k: g[k] for k in params}
            params, opt_state = apply_optimizer(optimizer, g, opt_state, params)
        return params

    @jax.jit  # every optimizer's two updates as one program
    def updates(params):
        rates = (("core", 1e-3), ("synthesizer", 1e-5))
        clipped = {k: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(r)) for k, r in rates}
        return two_updates(program.trainer.optimizer, params), {
            key: [two_updates(o, {key: params[key]})[key] for o in (clipped[key], optax.adam(r))]
            for key, r in rates
        }

    got, references = updates(params)
    for key, rate in (("core", 1e-3), ("synthesizer", 1e-5)):
        want, unclipped = references[key]
        for a, b in zip(_leaves(got[key]), _leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        assert _max_gap(unclipped, want) > rate / 100

    assert _max_gap(plain_params, untouched) == 0
    for gate in ("hi", "hf", "hg", "ho"):
        want = untouched["core"]["lstm"][gate]["bias"] + (gate == "hf")
        np.testing.assert_array_equal(biased["lstm"][gate]["bias"], want)


def test_memory_estimate_is_read_off_the_program_and_near_xlas():
    """The recurrent CLI's memory check (``estimated_bytes``, from the program's ``eval_shape``)
    is within 0.7-1.3x what XLA allocates for a donated update (arguments and temporaries;
    measured 0.83-0.89x at these sizes and up to LSTM 512), for BPTT, DNI+Aux and long episodes;
    a state twice as large is estimated larger."""
    from sgjax.recurrent.loop import estimated_bytes, program_for, state_template

    sizes = [
        dict(task="copy", mode="bptt", hidden_units=64, batch_size=16, truncation=8),
        dict(task="repeat_copy", mode="dni_aux", hidden_units=128, batch_size=32, truncation=16),
        dict(task="copy", mode="dni", hidden_units=96, batch_size=8, truncation=4, max_length=200),
    ]
    estimates = []
    for size in sizes:
        config = RNNConfig(**size)
        update = jax.jit(program_for(config, None).chunk(1), donate_argnums=0)
        memory = update.lower(state_template(config, None), None).compile().memory_analysis()
        allocated = memory.argument_size_in_bytes + memory.temp_size_in_bytes
        estimates.append(estimated_bytes(config, None))
        assert 0.7 * allocated <= estimates[-1] <= 1.3 * allocated, (size, estimates[-1], allocated)
    wider = RNNConfig(**(sizes[0] | dict(hidden_units=128)))
    assert estimated_bytes(wider, None) > 2 * estimates[0]

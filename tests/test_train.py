"""The compiled training loop: accuracy floors, determinism, one compile per chunk shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sgjax.data.device import load_dataset, to_device
from sgjax.training.config import TrainConfig
from sgjax.training.loop import (
    chunk_lengths,
    chunk_plan,
    init_train_state,
    make_run_chunk,
    train_and_evaluate,
)

# Floors measured on the embedded MNIST (BUILD_NOTES.md, "Accuracy floors"): 300 steps at
# learning rate 1e-3, seeds 0-2 reached bp 0.946-0.950, sg 0.827-0.847, cdni 0.836-0.857.
FLOOR_CONFIG = dict(num_steps=300, eval_every=150, learning_rate=1e-3, sg_hidden_units=256)
ACCURACY_FLOORS = {"bp": 0.93, "sg": 0.78, "cdni": 0.78}


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", None)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("mode", ["bp", "sg", "cdni"])
def test_short_run_reaches_floor_and_repeats_exactly(mode: str, mnist):
    config = TrainConfig(mode=mode, seed=0, **FLOOR_CONFIG)
    first = train_and_evaluate(config, mnist, log=lambda _: None)
    second = train_and_evaluate(config, mnist, log=lambda _: None)

    assert first.status == "completed"
    assert [r.step for r in first.records] == [150, 300]
    assert first.records[-1].test_accuracy >= ACCURACY_FLOORS[mode]
    assert first.records[-1].test_accuracy > first.records[0].test_accuracy - 0.02

    strip = lambda records: [r.__dict__ | {"elapsed_s": 0} for r in records]  # noqa: E731
    assert strip(first.records) == strip(second.records)
    for a, b in zip(_leaves(first.state), _leaves(second.state), strict=True):
        np.testing.assert_array_equal(a, b)

    # The hidden blocks really trained (a run that only trains the output layer would also
    # pass an accuracy floor on MNIST).
    initial = init_train_state(config)
    blocks_now = jax.tree_util.tree_leaves(_blocks(first.state.model))
    blocks_then = jax.tree_util.tree_leaves(_blocks(initial.model))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(blocks_now, blocks_then, strict=True))
    assert moved > 1e-2


def _blocks(model):
    return [s.params for s in model.stages[:-1]]


def test_another_seed_gives_other_numbers(mnist):
    base = dict(mode="cdni", num_steps=20, eval_every=20, hidden_units=32)
    a = train_and_evaluate(TrainConfig(seed=0, **base), mnist, log=lambda _: None)
    b = train_and_evaluate(TrainConfig(seed=1, **base), mnist, log=lambda _: None)
    assert a.records[-1].train_loss != b.records[-1].train_loss


def test_chunk_plan_cuts_periods_the_same_way_from_any_boundary():
    plan = chunk_plan(0, 25, 10, 4)
    assert plan == [4, 4, 2, 4, 4, 2, 4, 1]
    boundaries = np.cumsum(plan)
    assert {10, 20, 25} <= set(boundaries)  # every evaluation point ends a chunk
    for i, boundary in enumerate(boundaries[:-1]):
        assert chunk_plan(int(boundary), 25, 10, 4) == plan[i + 1 :]
    assert chunk_plan(0, 500_000, 10_000, 1_000) == [1_000] * 500


def test_sub_chunks_change_only_the_rounding_of_training_means(mnist):
    base = dict(mode="bp", hidden_units=32, num_steps=40, eval_every=20, learning_rate=1e-3)
    whole = train_and_evaluate(TrainConfig(**base, chunk_steps=20), mnist, log=lambda _: None)
    pieces = train_and_evaluate(TrainConfig(**base, chunk_steps=7), mnist, log=lambda _: None)
    for a, b in zip(whole.records, pieces.records, strict=True):
        assert a.step == b.step
        assert a.test_loss == b.test_loss  # same parameters after the same steps
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


def test_chunk_lengths_cover_the_run():
    assert chunk_lengths(1000, 250) == [250] * 4
    assert chunk_lengths(1001, 250) == [250] * 4 + [1]
    assert chunk_lengths(5, 10) == [5]


@pytest.mark.parametrize("mode", ["bp", "sg"])
def test_a_chunk_compiles_once_across_calls(mode: str, mnist):
    config = TrainConfig(mode=mode, hidden_units=32, sg_hidden_units=32, num_steps=30)
    traces = []
    run_chunk = make_run_chunk(config, 10)

    def counted(state, data):
        traces.append(1)
        return run_chunk(state, data)

    jitted = jax.jit(counted)
    state = init_train_state(config)
    data = to_device(mnist)
    losses = []
    for _ in range(3):
        state, metrics = jitted(state, data)
        losses.append(float(metrics.loss))
    assert len(traces) == 1
    assert int(state.step) == 30
    assert len(set(losses)) == 3


def test_learning_rate_in_records_follows_the_schedule(mnist):
    config = TrainConfig(mode="bp", hidden_units=16, num_steps=10, eval_every=1, learning_rate=1e-3)
    result = train_and_evaluate(config, mnist, log=lambda _: None)
    rates = [r.learning_rate for r in result.records]
    # Record k describes steps up to k; step index k-1 used the rate shown (boundaries 6, 8).
    assert rates == pytest.approx([1e-3] * 6 + [1e-4] * 2 + [1e-5] * 2, rel=1e-5)

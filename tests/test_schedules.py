"""The paper's piecewise-constant learning rate and how the config scales its boundaries."""

from __future__ import annotations

import pytest

from sgjax.core.optim import piecewise_schedule
from sgjax.training.config import ConfigError, TrainConfig


def test_paper_schedule_values_around_each_boundary():
    config = TrainConfig()
    assert config.resolved_lr_boundaries == (300_000, 400_000)
    schedule = piecewise_schedule(config.learning_rate, config.resolved_lr_boundaries)
    expected = {
        0: 3e-5,
        299_999: 3e-5,
        300_000: 3e-6,
        399_999: 3e-6,
        400_000: 3e-7,
        499_999: 3e-7,
    }
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step


def test_shorter_runs_keep_the_boundary_fractions():
    assert TrainConfig(num_steps=100_000).resolved_lr_boundaries == (60_000, 80_000)
    assert TrainConfig(num_steps=1_000).resolved_lr_boundaries == (600, 800)


def test_explicit_boundaries_override_the_fractions():
    config = TrainConfig(num_steps=1_000, lr_boundaries=(100, 900)).validate()
    schedule = piecewise_schedule(1.0, config.resolved_lr_boundaries)
    assert [float(schedule(s)) for s in (99, 100, 899, 900)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("boundaries", [(0, 10), (50, 50), (80, 20), (10, 100), (-5,)])
def test_impossible_boundaries_are_refused(boundaries):
    with pytest.raises(ConfigError, match="--lr_boundaries"):
        TrainConfig(num_steps=100, lr_boundaries=boundaries).validate()

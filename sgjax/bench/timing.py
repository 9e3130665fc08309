"""Kept for tools/rnn_step_time.py: the timing helpers are in ``sgjax.bench.programs``."""

from sgjax.bench.programs import compiled_flops  # noqa: F401

"""What the command-line entry points share: one-line errors, exit codes, one run end to end."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags, logging

from sgjax.config import ConfigError, TrainConfig
from sgjax.datasets import DataError, load_dataset
from sgjax.report import (
    MetricsWriter,
    OutputError,
    build_results,
    prepare_output_dir,
    summary_lines,
    write_json_atomic,
)
from sgjax.train import train

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
DEFAULT_OUTPUT_ROOT = "runs"


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line to stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def make_flags_parser(
    flag_values: flags.FlagValues,
) -> Callable[[Sequence[str]], list[str]]:
    """An absl ``flags_parser`` that turns a bad flag into one line and exit code 2."""

    def parse(argv: Sequence[str]) -> list[str]:
        try:
            rest = flag_values(argv)
            # JAX and orbax log routine INFO lines through absl; keep stderr for what matters.
            logging.set_verbosity(logging.WARNING)
        except flags.Error as error:
            fail(f"{error}; see --helpshort for the valid values")
        if len(rest) > 1:
            fail(f"unexpected arguments {' '.join(rest[1:])!r}; every setting is a --flag")
        return rest

    return parse


def parse_int_list(name: str, values: Sequence[str] | None) -> tuple[int, ...] | None:
    """Parse a comma-separated flag of integers, or fail with one line."""
    if values is None:
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        fail(f"--{name}={','.join(values)} must be comma-separated integers, e.g. 300000,400000")
    return None


def run_training(config: TrainConfig) -> int:
    """Validate, load data, train, write results; returns the process exit code."""
    try:
        config.validate()
        dataset = load_dataset(config.dataset, config.data_dir)
        if config.batch_size > dataset.train_size:
            raise ConfigError(
                f"--batch_size={config.batch_size} is larger than the {dataset.train_size} "
                f"training images of {dataset.name} ({dataset.source}); use a smaller batch"
            )
        output_dir = prepare_output_dir(
            config.output_dir or Path(DEFAULT_OUTPUT_ROOT) / config.mode
        )
    except (ConfigError, DataError, OutputError) as error:
        fail(str(error))
    print(f"data: {dataset.reason}", flush=True)
    print(f"writing to {output_dir}", flush=True)

    metrics = MetricsWriter(output_dir / "metrics.csv", config.hidden_layers * config.decoupled)
    try:
        result = train(config, dataset, on_record=metrics.write)
    finally:
        metrics.close()
    results = build_results(config, dataset, result)
    write_json_atomic(output_dir / "results.json", results)
    for line in summary_lines(results):
        print(line, flush=True)
    if result.status == "diverged":
        print(
            f"error: run diverged: {result.message}; lower --learning_rate "
            f"(results in {output_dir})",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_DIVERGED
    if result.status == "interrupted":
        print(f"interrupted; partial results in {output_dir}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0

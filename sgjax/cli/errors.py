"""What the command-line entry points share: one-line errors, exit codes, flag parsing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import flags, logging

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line to stderr and exit with ``code``."""
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def make_flags_parser(flag_values: flags.FlagValues) -> Callable[[Sequence[str]], list[str]]:
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
    try:
        return None if values is None else tuple(int(v) for v in values)
    except ValueError:
        fail(f"--{name}={','.join(values)} must be comma-separated integers, e.g. 300000,400000")

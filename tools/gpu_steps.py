"""Pick each mode's step count for tools/gpu_bench.sh from a calibration benchmark.json.

  python tools/gpu_steps.py CALIBRATION/benchmark.json --budget_s=70 --full_steps=500000

Prints one tab-separated line per mode, ``mode num_steps eval_every note``: the full run when its
measured time per step fits the budget, else the longest run (a multiple of 10 evaluation
periods) that does, with a note saying so. With ``--together`` it prints one line,
``all num_steps eval_every note``: one step count for every mode, so that all the modes' runs
together fit the budget (the seed's tables compare methods at equal steps). The schedule keeps
its shape (decays at 60% and 80% of the run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def steps_for(ms_per_step: float, budget_s: float, full_steps: int) -> tuple[int, int]:
    """(num_steps, eval_every): as many steps as fit ``budget_s``, at most ``full_steps``."""
    fit = int(budget_s * 1e3 / ms_per_step)
    if fit >= full_steps:
        return full_steps, max(full_steps // 50, 1)
    eval_every = max(fit // 10, 1)
    return 10 * eval_every, eval_every


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_json", type=Path)
    parser.add_argument("--budget_s", type=float, default=70.0)
    parser.add_argument("--full_steps", type=int, default=500_000)
    parser.add_argument("--together", action="store_true", help="one step count for all modes")
    args = parser.parse_args()
    try:
        programs = json.loads(args.benchmark_json.read_text())["programs"]
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot read calibration {args.benchmark_json}: {error}", file=sys.stderr)
        return 2
    if args.together:
        programs = [
            {
                "mode": "all",
                "ms_per_step": sum(float(p["ms_per_step"]) for p in programs),
                "num_runs": "+".join(str(p["num_runs"]) for p in programs),
            }
        ]
    for program in programs:
        ms = float(program["ms_per_step"])
        steps, every = steps_for(ms, args.budget_s, args.full_steps)
        note = (
            "full"
            if steps == args.full_steps
            else f"SHORTENED from {args.full_steps} (would take {ms * args.full_steps / 1e3:.0f} s"
            f" at {ms:.3f} ms/step for {program['num_runs']} vmapped seeds)"
        )
        print(f"{program['mode']}\t{steps}\t{every}\t{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

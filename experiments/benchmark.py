"""Compare bp, sg and cdni under identical settings: one table, JSON, learning curves, costs.

  python experiments/benchmark.py --preset=quick --output_dir=/tmp/bench_quick
  python experiments/benchmark.py --preset=paper_100k --num_seeds=4
  python experiments/benchmark.py --preset=quick --sweep=learning_rate=3e-4,1e-3

Writes table.md, benchmark.json, curves.png, sg_loss.png and time_per_step.png to --output_dir.
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.benchmark_cli import define_flags, main
from sgjax.cli import make_flags_parser

FLAGS = flags.FLAGS
define_flags(FLAGS)

if __name__ == "__main__":
    sys.exit(app.run(lambda argv: main(FLAGS), flags_parser=make_flags_parser(FLAGS)))

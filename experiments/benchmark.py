"""Compare bp, sg and cdni under identical settings: one table, JSON, learning curves, costs.

  python experiments/benchmark.py --preset=quick --output_dir=/tmp/bench_quick
  python experiments/benchmark.py --preset=paper_100k --num_seeds=4
  python experiments/benchmark.py --preset=quick --sweep=learning_rate=3e-4,1e-3

Writes table.md, benchmark.json, curves.png, sg_loss.png, time_per_step.png and accuracy_time.png
to --output_dir.
"""

from __future__ import annotations

import os
import sys

if "--parallel=layers" in sys.argv and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Layer-parallel runs on a CPU need simulated devices, which must be asked for before JAX
    # starts (they share the machine's cores). Harmless on GPUs.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

from absl import app, flags  # noqa: E402

from sgjax.cli.benchmark import define_flags, main  # noqa: E402
from sgjax.cli.errors import make_flags_parser  # noqa: E402

FLAGS = flags.FLAGS
define_flags(FLAGS)

if __name__ == "__main__":
    sys.exit(app.run(lambda argv: main(FLAGS), flags_parser=make_flags_parser(FLAGS)))

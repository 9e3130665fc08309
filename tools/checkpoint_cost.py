"""Measure checkpoint size, save and restore time at the paper's network sizes.

  python tools/checkpoint_cost.py [--saves=5]

Each mode first trains 20 steps so Adam's moments are non-zero (an initial state compresses far
better than a real one), then saves ``--saves`` times and restores once.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags

from sgjax.bench.names import markdown_row, markdown_table
from sgjax.cli.errors import make_flags_parser
from sgjax.data import load_dataset
from sgjax.training.checkpoint import Checkpointer
from sgjax.training.config import TrainConfig
from sgjax.training.loop import PeriodMetrics, Resume, init_train_state, train_and_evaluate

flags.DEFINE_integer("saves", 5, "Saves per mode (median reported).", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    dataset = load_dataset("mnist", None)
    print(
        "\n".join(
            markdown_table(["mode", "floats in state", "on disk", "save (median)", "restore"])
        )
    )
    for mode in ("bp", "cdni", "sg"):
        config = TrainConfig(mode=mode, num_steps=20, eval_every=20, learning_rate=1e-3)
        state = train_and_evaluate(config, dataset, log=lambda _: None).state
        folder = Path(tempfile.mkdtemp(prefix=f"ckpt-{mode}-"))
        checkpointer = Checkpointer(folder)
        saves = []
        for _ in range(FLAGS.saves):
            state = state._replace(step=state.step + 10_000)
            start = time.perf_counter()
            checkpointer.save(Resume(state, [], PeriodMetrics(), 0.0, 0.0), config)
            saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.restore(config, jax.eval_shape(lambda c=config: init_train_state(c)))
        restore = time.perf_counter() - start
        latest = folder / str(checkpointer.latest_step())
        size = int(subprocess.check_output(["du", "-sb", str(latest)]).split()[0])
        floats = sum(x.size for x in jax.tree_util.tree_leaves(state.model))
        cells = [mode, f"{floats / 1e6:.2f} M", f"{size / 2**20:.1f} MiB"]
        cells += [f"{statistics.median(saves) * 1e3:.0f} ms", f"{restore * 1e3:.0f} ms"]
        print(markdown_row(cells), flush=True)
        checkpointer.close()
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))

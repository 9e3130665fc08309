"""Layer-parallel benchmark: bp (single device, model-parallel, GPipe) and sg (single device,
layer-parallel pipeline) on 1, 2 and 4 devices; examples/s, test accuracy at the same number of
examples, each stage's own time and the ideal speed-up from those times.

On a CPU this script asks XLA for 4 simulated devices (unless XLA_FLAGS already sets a count);
they share the machine's cores. Example (a few minutes on a 2-core CPU):

  python experiments/parallel_benchmark.py --num_steps=200 --sg_hidden_units=256
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before JAX starts; harmless on GPUs and TPUs.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from sgjax.cli import fail, make_flags_parser, parse_int_list  # noqa: E402
from sgjax.config import ConfigError, TrainConfig  # noqa: E402
from sgjax.datasets import DataError, load_dataset  # noqa: E402
from sgjax.parallel import validate_parallel  # noqa: E402
from sgjax.parallel_benchmark import (  # noqa: E402
    ParallelBenchmarkSettings,
    notes,
    run_parallel_benchmark,
    table_lines,
)

flags.DEFINE_enum("mode", "sg", ["sg", "cdni"], "Synthetic-gradient variant to compare with bp.")
flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts to run the parallel schedules on.")
flags.DEFINE_integer("microbatches", 4, "GPipe microbatches per minibatch.", lower_bound=1)
flags.DEFINE_integer("num_steps", 200, "Minibatches per run.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Minibatch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (constant for short runs).")
flags.DEFINE_integer("hidden_layers", 3, "Hidden blocks.", lower_bound=1)
flags.DEFINE_integer("hidden_units", 256, "Units per hidden block.", lower_bound=1)
flags.DEFINE_integer("sg_hidden_layers", None, "Module depth (default: the mode's).")
flags.DEFINE_integer("sg_hidden_units", 1024, "Module width.", lower_bound=1)
flags.DEFINE_integer("timing_repeats", 20, "Calls per stage when timing it alone.", lower_bound=1)
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "Dataset.")
flags.DEFINE_string("data_dir", None, "Folder with the four MNIST-format IDX files.")
flags.DEFINE_integer("seed", 0, "Random seed.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    common = dict(
        num_steps=FLAGS.num_steps,
        eval_every=FLAGS.num_steps,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        lr_boundaries=(),
        hidden_layers=FLAGS.hidden_layers,
        hidden_units=FLAGS.hidden_units,
        sg_hidden_layers=FLAGS.sg_hidden_layers,
        sg_hidden_units=FLAGS.sg_hidden_units,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        seed=FLAGS.seed,
    )
    try:
        settings = ParallelBenchmarkSettings(
            sg=TrainConfig(mode=FLAGS.mode, **common).validate(),
            bp=TrainConfig(mode="bp", **common).validate(),
            device_counts=parse_int_list("devices", FLAGS.devices) or (1,),
            microbatches=FLAGS.microbatches,
            timing_repeats=FLAGS.timing_repeats,
        )
        validate_parallel(settings.bp, "bp_gpipe", settings.microbatches)
        dataset = load_dataset(FLAGS.dataset, FLAGS.data_dir)
    except (ConfigError, DataError) as error:
        fail(str(error))
    print(f"data: {dataset.reason}", flush=True)
    rows = run_parallel_benchmark(settings, dataset, log=lambda line: print(line, flush=True))
    print()
    for line in table_lines(rows) + [""] + notes(settings):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))

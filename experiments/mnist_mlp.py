"""Train the paper's MNIST MLP with backprop (bp), synthetic gradients (sg) or cDNI (cdni).

Defaults are the paper's settings. The README's quick example (under a minute on a 2-core CPU):

  python experiments/mnist_mlp.py --mode=sg --num_steps=3000 --eval_every=1000 \
      --sg_hidden_layers=1 --sg_hidden_units=256 --learning_rate=1e-3
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.cli.errors import fail, make_flags_parser
from sgjax.cli.flags import config_from_flags, define_train_flags
from sgjax.cli.run import run_training
from sgjax.training.config import MODES, PARALLEL, ConfigError, TrainConfig

_DEFAULTS = TrainConfig()

flags.DEFINE_enum(
    "mode", _DEFAULTS.mode, MODES, "bp: backprop; sg: DNI; cdni: label-conditioned DNI."
)
define_train_flags(flags.FLAGS)
flags.DEFINE_enum(
    "parallel",
    _DEFAULTS.parallel,
    PARALLEL,
    "none: one device; layers: every layer (block with its module, output layer) on its own "
    "device, pipelined (sg, cdni) or model-parallel / GPipe (bp).",
)
flags.DEFINE_integer(
    "num_devices", _DEFAULTS.num_devices, "Devices for --parallel=layers (0: all there are)."
)
flags.DEFINE_integer(
    "microbatches",
    _DEFAULTS.microbatches,
    "GPipe microbatches per minibatch for --parallel=layers --mode=bp (1: model parallelism).",
)
flags.DEFINE_integer(
    "chunk_steps",
    _DEFAULTS.chunk_steps,
    "Longest compiled chunk of steps: a progress line, and a chance to stop cleanly, after each.",
)
flags.DEFINE_integer(
    "checkpoint_every",
    None,
    "Steps between checkpoints, a multiple of --eval_every (default: every evaluation; 0: none).",
)
flags.DEFINE_string("output_dir", None, "Where results go (default: runs/<mode>).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --output_dir.")
flags.DEFINE_bool("overwrite", False, "Replace an earlier run in --output_dir.")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    del argv
    try:
        config = config_from_flags(
            FLAGS,
            mode=FLAGS.mode,
            chunk_steps=FLAGS.chunk_steps,
            parallel=FLAGS.parallel,
            num_devices=FLAGS.num_devices,
            microbatches=FLAGS.microbatches,
            checkpoint_every=FLAGS.checkpoint_every,
            output_dir=FLAGS.output_dir,
        )
    except ConfigError as error:
        fail(str(error))
    return run_training(config, resume=FLAGS.resume, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))

"""Train the paper's MNIST MLP with backprop (bp), synthetic gradients (sg) or cDNI (cdni).

Defaults are the paper's settings. Example (about a minute on a 2-core CPU):

  python experiments/mnist_mlp.py --mode=sg --num_steps=1000 --eval_every=250
"""

from __future__ import annotations

import sys

from absl import app, flags

from sgjax.cli import make_flags_parser, parse_int_list
from sgjax.config import DATASETS, MODES, TrainConfig
from sgjax.runner import run_training

_DEFAULTS = TrainConfig()

flags.DEFINE_enum(
    "mode", _DEFAULTS.mode, MODES, "bp: backprop; sg: DNI; cdni: label-conditioned DNI."
)
flags.DEFINE_integer("num_steps", _DEFAULTS.num_steps, "Training steps (minibatch updates).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Minibatch size.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Initial Adam learning rate.")
flags.DEFINE_list(
    "lr_boundaries",
    None,
    "Steps at which the learning rate is divided by 10 (default: 0.6 and 0.8 of --num_steps).",
)
flags.DEFINE_integer("hidden_layers", _DEFAULTS.hidden_layers, "Hidden blocks (Dense-BN-ReLU).")
flags.DEFINE_integer("hidden_units", _DEFAULTS.hidden_units, "Units per hidden block.")
flags.DEFINE_integer(
    "sg_hidden_layers",
    None,
    "Hidden layers of each synthetic-gradient module (default: 2 for sg, 0 for cdni).",
)
flags.DEFINE_integer(
    "sg_hidden_units", _DEFAULTS.sg_hidden_units, "Units per synthetic-gradient module layer."
)
flags.DEFINE_enum("dataset", _DEFAULTS.dataset, DATASETS, "Dataset to train and test on.")
flags.DEFINE_string(
    "data_dir", None, "Folder with the four MNIST-format IDX files (optionally .gz)."
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed (initialisation and batch sampling).")
flags.DEFINE_integer("eval_every", _DEFAULTS.eval_every, "Steps between test evaluations.")
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
    config = TrainConfig(
        mode=FLAGS.mode,
        num_steps=FLAGS.num_steps,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        lr_boundaries=parse_int_list("lr_boundaries", FLAGS.lr_boundaries),
        hidden_layers=FLAGS.hidden_layers,
        hidden_units=FLAGS.hidden_units,
        sg_hidden_layers=FLAGS.sg_hidden_layers,
        sg_hidden_units=FLAGS.sg_hidden_units,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        seed=FLAGS.seed,
        eval_every=FLAGS.eval_every,
        chunk_steps=FLAGS.chunk_steps,
        checkpoint_every=FLAGS.checkpoint_every,
        output_dir=FLAGS.output_dir,
    )
    return run_training(config, resume=FLAGS.resume, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=make_flags_parser(FLAGS)))

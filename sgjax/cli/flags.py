"""The training flags shared by the scripts, and the config they make.

``experiments/mnist_mlp.py`` and ``experiments/benchmark.py`` take the same network, data and
schedule flags; defining them once keeps their names, defaults and help identical.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from sgjax.cli.errors import parse_int_list
from sgjax.training.config import DATASETS, TrainConfig

_DEFAULTS = TrainConfig()
SHARED_FIELDS = (
    "num_steps",
    "batch_size",
    "learning_rate",
    "lr_boundaries",
    "hidden_layers",
    "hidden_units",
    "sg_hidden_layers",
    "sg_hidden_units",
    "dataset",
    "data_dir",
    "seed",
    "eval_every",
)


def define_train_flags(fv: flags.FlagValues) -> None:
    """Define the shared training flags on ``fv`` with the paper's defaults."""
    flags.DEFINE_integer(
        "num_steps", _DEFAULTS.num_steps, "Training steps (minibatch updates).", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Minibatch size.", flag_values=fv)
    flags.DEFINE_float(
        "learning_rate", _DEFAULTS.learning_rate, "Initial Adam learning rate.", flag_values=fv
    )
    flags.DEFINE_list(
        "lr_boundaries",
        None,
        "Steps at which the learning rate is divided by 10 (default: 0.6 and 0.8 of "
        "--num_steps; an empty value keeps it constant).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "hidden_layers", _DEFAULTS.hidden_layers, "Hidden blocks (Dense-BN-ReLU).", flag_values=fv
    )
    flags.DEFINE_integer(
        "hidden_units", _DEFAULTS.hidden_units, "Units per hidden block.", flag_values=fv
    )
    flags.DEFINE_integer(
        "sg_hidden_layers",
        None,
        "Hidden layers of each synthetic-gradient module (default: 2 for sg, 0 for cdni).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "sg_hidden_units",
        _DEFAULTS.sg_hidden_units,
        "Units per synthetic-gradient module layer.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dataset", _DEFAULTS.dataset, DATASETS, "Dataset to train and test on.", flag_values=fv
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Folder with the four MNIST-format IDX files (optionally .gz).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "seed", _DEFAULTS.seed, "Random seed (initialisation, batch sampling).", flag_values=fv
    )
    flags.DEFINE_integer(
        "eval_every", _DEFAULTS.eval_every, "Steps between test evaluations.", flag_values=fv
    )


DECOUPLING_FIELDS = ("update_prob", "bp_lambda", "stale_decay", "synthetic_inputs")
"""Flags of issue 12's methods (``define_decoupling_flags``)."""


def define_decoupling_flags(fv: flags.FlagValues) -> None:
    """Define --update_prob, --bp_lambda, --stale_decay and --synthetic_inputs on ``fv``."""
    flags.DEFINE_float(
        "update_prob",
        _DEFAULTS.update_prob,
        "Probability that each layer (and its module) updates at a step; for bp a layer updates "
        "only when every layer above it ran its backward pass (1: every step).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "bp_lambda",
        _DEFAULTS.bp_lambda,
        "--mode=bp_lambda: weight of the backpropagated gradient against the synthetic one "
        "(1: backprop, 0: DNI).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "stale_decay",
        _DEFAULTS.stale_decay,
        "--mode=stale_grad: decay of the moving average of past true gradients.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "synthetic_inputs",
        _DEFAULTS.synthetic_inputs,
        "With --mode=sg or cdni: the complete unlock, every layer also trains on its input as "
        "predicted from the image by a one-hidden-layer model (--sg_hidden_units units).",
        flag_values=fv,
    )


CNN_FIELDS = ("filters", "kernel_size")
"""Flags of the convolutional network (``define_cnn_flags``)."""


def define_cnn_flags(fv: flags.FlagValues) -> None:
    """Define ``--filters`` and ``--kernel_size`` (experiments/mnist_cnn.py, the benchmark)."""
    flags.DEFINE_integer(
        "filters",
        None,
        "Filters of every convolution, the synthesizers' too (default: the paper's, 64 for "
        "MNIST and Fashion-MNIST, 128 for CIFAR-10).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "kernel_size",
        _DEFAULTS.kernel_size,
        "Square kernel size of every convolution, the synthesizers' too.",
        flag_values=fv,
    )


def config_from_flags(fv: flags.FlagValues, **fields: Any) -> TrainConfig:
    """A TrainConfig from the shared flags (and the CNN flags where they are defined);
    ``fields`` sets the rest (mode, model, output_dir, ...)."""
    optional = CNN_FIELDS + DECOUPLING_FIELDS
    names = SHARED_FIELDS + tuple(name for name in optional if name in fv)
    values = {name: fv[name].value for name in names}
    values["lr_boundaries"] = parse_int_list("lr_boundaries", values["lr_boundaries"])
    return TrainConfig(**{**values, **fields})

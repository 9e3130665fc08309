"""The training flags the scripts share (defined once: identical names, defaults and help), and
the config they make."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from absl import flags

from sgjax.cli.errors import parse_int_list
from sgjax.training.config import DATASETS, RunConfig, TrainConfig

_DEFAULTS = TrainConfig()


TRAIN_HELP = {
    "num_steps": "Training steps (minibatch updates).",
    "batch_size": "Minibatch size.",
    "learning_rate": "Initial Adam learning rate.",
    "lr_boundaries": "Steps at which the learning rate is divided by 10 (default: 0.6 and 0.8 of "
    "--num_steps; an empty value keeps it constant).",
    "hidden_layers": "Hidden blocks (Dense-BN-ReLU).",
    "hidden_units": "Units per hidden block.",
    "sg_hidden_layers": "Hidden layers of each synthetic-gradient module (default: 2 for sg, 0 "
    "for cdni).",
    "sg_hidden_units": "Units per synthetic-gradient module layer.",
    "dataset": "Dataset to train and test on.",
    "data_dir": "Folder with the four MNIST-format IDX files (optionally .gz).",
    "seed": "Random seed (initialisation, batch sampling).",
    "eval_every": "Steps between test evaluations.",
}
SHARED_FIELDS = tuple(TRAIN_HELP)
DECOUPLING_HELP = {
    "update_prob": "Probability that each layer (and its module) updates at a step; for bp a "
    "layer updates only when every layer above it ran its backward pass (1: every step).",
    "bp_lambda": "--mode=bp_lambda: weight of the backpropagated gradient against the synthetic "
    "one (1: backprop, 0: DNI).",
    "stale_decay": "--mode=stale_grad(_example): decay of the moving average of past true "
    "gradients (over steps of the batch mean; per example).",
    "synthetic_inputs": "With --mode=sg or cdni: the complete unlock, every layer also trains "
    "on its input as predicted from the image by a one-hidden-layer model (--sg_hidden_units "
    "units).",
}
DECOUPLING_FIELDS = tuple(DECOUPLING_HELP)
CNN_HELP = {
    "filters": "Filters of every convolution, the synthesizers' too (default: the paper's, 64 "
    "for MNIST and Fashion-MNIST, 128 for CIFAR-10).",
    "kernel_size": "Square kernel size of every convolution, the synthesizers' too.",
    "pool_min_size": "Conv stages pool (stride 2) only while their map is larger than this; "
    "later ones keep its size (0: every stage pools).",
}
CNN_FIELDS = tuple(CNN_HELP)
_KINDS = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float}
_KINDS |= {"str": flags.DEFINE_string, "tuple": flags.DEFINE_list}


def define_fields(
    fv: flags.FlagValues,
    defaults: RunConfig,
    helps: dict[str, str],
    choices: dict[str, Sequence[str]] | None = None,
) -> None:
    """Define a flag on ``fv`` for each field of ``defaults`` named in ``helps``, with its
    default: an enum of ``choices[name]``, else of the field's type (a tuple: a list)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(defaults)}
    for name, text in helps.items():
        default = getattr(defaults, name)
        if name in (choices or {}):
            flags.DEFINE_enum(name, default, choices[name], text, flag_values=fv)
            continue
        kind = next(k for k in _KINDS if types[name].startswith(k))
        _KINDS[kind](name, default, text, flag_values=fv)


def define_run_flags(fv: flags.FlagValues, defaults: RunConfig, unit: str, folder: str) -> None:
    """Define --chunk_steps, --checkpoint_every, --output_dir, --resume and --overwrite."""
    helps = {
        "chunk_steps": f"Longest compiled chunk of {unit}: a progress line, and a chance to "
        "stop cleanly, after each.",
        "checkpoint_every": f"{unit.capitalize()} between checkpoints, a multiple of "
        "--eval_every (default: every evaluation; 0: none).",
        "output_dir": f"Where results go (default: {folder}).",
    }
    define_fields(fv, defaults, helps)
    for name, text in (
        ("resume", "Continue from the latest checkpoint in --output_dir."),
        ("overwrite", "Replace an earlier run in --output_dir."),
    ):
        flags.DEFINE_bool(name, False, text, flag_values=fv)


def define_train_flags(fv: flags.FlagValues) -> None:
    define_fields(fv, _DEFAULTS, TRAIN_HELP, {"dataset": DATASETS})


def define_decoupling_flags(fv: flags.FlagValues) -> None:
    define_fields(fv, _DEFAULTS, DECOUPLING_HELP)


def define_cnn_flags(fv: flags.FlagValues) -> None:
    define_fields(fv, _DEFAULTS, CNN_HELP)


def config_from_flags(fv: flags.FlagValues, **fields: Any) -> TrainConfig:
    """A TrainConfig from the shared flags (and the CNN flags where they are defined);
    ``fields`` sets the rest (mode, model, output_dir, ...)."""
    optional = (name for name in CNN_FIELDS + DECOUPLING_FIELDS if name in fv)
    values = {name: fv[name].value for name in (*SHARED_FIELDS, *optional)}
    values["lr_boundaries"] = parse_int_list("lr_boundaries", values["lr_boundaries"])
    return TrainConfig(**{**values, **fields})

"""The flags and main of experiments/mnist_mlp.py and mnist_cnn.py (one definition: the same
flags and files)."""

from __future__ import annotations

from collections.abc import Callable

from absl import flags

from sgjax.cli.distributed import define_distributed_flags, initialize_from_flags, stop_process
from sgjax.cli.errors import fail
from sgjax.cli.flags import (
    config_from_flags,
    define_cnn_flags,
    define_decoupling_flags,
    define_fields,
    define_run_flags,
    define_train_flags,
)
from sgjax.cli.run import run_training
from sgjax.training.config import ENGINES, MODES, PARALLEL, ConfigError, TrainConfig

_DEFAULTS = TrainConfig()
CNN_UNUSED_FLAGS = ("hidden_units", "sg_hidden_units")  # the CNN's widths are --filters


SCRIPT_HELP = {
    "mode": "bp: backprop; sg: DNI; cdni: label-conditioned DNI; bp_lambda: BP(lambda); dgl: "
    "greedy local learning; zero_grad, stale_grad, stale_grad_example: the zero, stale (the "
    "paper's) and per-example stale gradient baselines.",
    "sg_warmup_steps": "sg, cdni: the first steps train by backprop while the synthesizers "
    "regress onto its gradients (0: none).",
}
PARALLEL_HELP = {
    "parallel": "none: one device; layers: every layer (block with its module, output layer) on "
    "its own device, pipelined (sg, cdni) or model-parallel / GPipe (bp).",
    "num_devices": "Devices for --parallel=layers (0: all there are).",
    "engine": "For --parallel=layers: dispatch (one call per layer per tick from this process) "
    "or spmd (one program per chunk, a stage per device; spans processes with --distributed).",
    "microbatches": "GPipe microbatches per minibatch for --parallel=layers --mode=bp (1: model "
    "parallelism).",
}


def define_script_flags(fv: flags.FlagValues, model: str) -> None:  # model: "mlp" or "cnn"
    define_fields(fv, _DEFAULTS, SCRIPT_HELP, {"mode": MODES})
    define_train_flags(fv)
    define_decoupling_flags(fv)
    if model == "cnn":
        define_cnn_flags(fv)
        fv["hidden_layers"].help = (
            "Convolutional stages (conv-BN-ReLU-pooling); the paper's depth is this plus the "
            "linear classifier."
        )
        sg_help = "Hidden convolutions of each synthetic-gradient module (default: 2 for sg, 0 "
        fv["sg_hidden_layers"].help = sg_help + "for cdni)."
        for name in CNN_UNUSED_FLAGS:
            fv[name].help = "Not used by the CNN (its widths are --filters); refused if given."
    fv["data_dir"].help = (
        "Folder with the four MNIST-format IDX files (optionally .gz), or for "
        "--dataset=cifar10 the CIFAR-10 python version (cifar-10-python.tar.gz or its "
        "extracted folder)."
    )
    define_fields(fv, _DEFAULTS, PARALLEL_HELP, {"parallel": PARALLEL, "engine": ENGINES})
    define_run_flags(fv, _DEFAULTS, "steps", "runs/<mode>")
    define_distributed_flags(fv)


def script_config(fv: flags.FlagValues, model: str) -> TrainConfig:
    """The run's configuration from the parsed flags; raises ConfigError (one line)."""
    if model == "cnn":
        given = [f"--{name}" for name in CNN_UNUSED_FLAGS if fv[name].present]
        if given:
            verb = "do" if len(given) > 1 else "does"
            raise ConfigError(
                f"{' and '.join(given)} {verb} not apply to the CNN: every convolution, the "
                "synthesizers' too, has --filters filters"
            )
    names = (*SCRIPT_HELP, "chunk_steps", *PARALLEL_HELP, "checkpoint_every", "output_dir")
    return config_from_flags(fv, model=model, **{name: fv[name].value for name in names})


def script_main(fv: flags.FlagValues, model: str) -> Callable[[list[str]], int]:
    """The script's ``main``: config, then one run end to end."""

    def main(argv: list[str]) -> int:
        try:
            config = script_config(fv, model)
            initialize_from_flags(fv)
        except ConfigError as error:
            fail(str(error))
        try:
            return run_training(config, resume=fv.resume, overwrite=fv.overwrite)
        except Exception as error:  # a collective failed: a peer is gone
            if not fv.distributed:
                raise
            stop_process(error)

    return main

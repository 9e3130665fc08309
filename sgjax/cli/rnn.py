"""experiments/rnn.py's flags, configuration and results; the run is ``sgjax.cli.run.run_job``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from absl import flags

from sgjax.cli.errors import fail
from sgjax.cli.flags import define_fields, define_run_flags
from sgjax.cli.run import Job, check_memory, run_job
from sgjax.core.recurrent import RECURRENT_MODES
from sgjax.data.text import TextCorpus, load_text_corpus
from sgjax.recurrent.config import RNN_TASKS, RNNConfig
from sgjax.recurrent.loop import (
    RNNRecord,
    char_lm_scores,
    curriculum_curve,
    estimated_bytes,
    state_template,
    text_identity,
    text_streams,
    train_recurrent,
)
from sgjax.recurrent.plots import plot_run
from sgjax.tasks.copy import SOLVED_BITS_PER_ELEMENT
from sgjax.training.config import ConfigError
from sgjax.training.loop import RunResult
from sgjax.training.records import run_results, speed_text

_DEFAULTS = RNNConfig()
RNN_RUN_FILES = ("results.json", "metrics.csv", "curves.png", "checkpoints")
CONFIG_FLAGS = tuple(f.name for f in dataclasses.fields(RNNConfig))  # each a flag of that name


RNN_HELP = {
    "task": "copy, repeat_copy (generated episodes with the paper's curriculum) or char_lm "
    "(character language modelling on --text_file).",
    "mode": "bptt: truncated BPTT; dni: synthetic gradient at every segment boundary; dni_aux: "
    "dni plus the auxiliary prediction of the synthetic gradient T steps ahead.",
    "truncation": "Time steps per segment (one update each).",
    "hidden_units": "LSTM units.",
    "batch_size": "Episodes (copy tasks) or text streams (char_lm) per batch.",
    "num_steps": "Updates (segments).",
    "learning_rate": "Adam learning rate (paper: 7e-5).",
    "seed": "Random seed.",
    "eval_every": "Updates between records (default: 1000 for the copy tasks, 5000 for char_lm, "
    "which scores the validation and test texts there).",
    "sg_scale": "Factor on the synthetic gradient the core consumes (paper: 0.1).",
    "synthesizer_units": "Width of the synthesizer's hidden layer (default: --hidden_units).",
    "sg_trains_core": "Backpropagate the synthesizer's regression loss into the core too "
    "(through the previous segment, recomputed).",
    "unscaled_target": "Bootstrap the synthesizer's target from its unscaled output.",
    "synthesizer_learning_rate": "The synthesizer's Adam rate (default: --learning_rate).",
    "clip_norm": "Clip the core's and the synthesizer's gradients each to this global norm.",
    "forget_bias": "Added to the LSTM's forget-gate bias at initialisation (e.g. 1).",
    "bits": "Copy tasks: bits per pattern vector.",
    "max_length": "Copy tasks: episodes are padded to this many time steps; the curriculum "
    "stops at the largest level that fits.",
    "text_file": "char_lm: a UTF-8 text to train on.",
    "valid_file": "char_lm: validation text (default: held out from --text_file).",
    "test_file": "char_lm: test text (default: held out from --text_file).",
    "valid_fraction": "char_lm without --valid_file: share of --text_file held out for validation.",
    "test_fraction": "char_lm without --test_file: share of --text_file held out for test.",
    "patience": "char_lm: stop after this many records without a better validation score (0: "
    "never).",
}


def define_rnn_flags(fv: flags.FlagValues) -> None:
    define_fields(fv, _DEFAULTS, RNN_HELP, {"task": RNN_TASKS, "mode": RECURRENT_MODES})
    define_run_flags(fv, _DEFAULTS, "updates", "runs/rnn-<task>-<mode>")


_TRAINING_COLUMNS = ("step", "train_bits", "sg_loss", "aux_loss")
METRICS_COLUMNS = {
    "copy": (*_TRAINING_COLUMNS, "level_n", "level_r", "episode_error", "max_episode_solved",
             "elapsed_s"),
    "char_lm": (*_TRAINING_COLUMNS, "valid_bpc", "test_bpc", "elapsed_s"),
}  # fmt: skip


def build_rnn_results(
    config: RNNConfig, corpus: TextCorpus | None, result: RunResult
) -> dict[str, Any]:
    last = result.records[-1] if result.records else None
    fields: dict[str, Any] = {
        "task": config.task,
        "mode": config.mode,
        "truncation": config.truncation,
        "network": f"LSTM {config.hidden_units} units, linear readout",
        "train_bits": last.train_bits if last else None,
    }
    if config.task == "char_lm":
        scores = char_lm_scores(result.records)
        fields |= {
            "test_bpc": scores.test_bpc,
            "best_valid_bpc": scores.best_valid_bpc,
            "best_step": scores.best_step,
            "text": {"source": corpus.source}
            | {f"{name}_chars": len(getattr(corpus, name)) for name in ("train", "valid", "test")}
            | {"vocab_size": corpus.vocab_size},
        }
    else:
        curriculum = curriculum_curve(config.copy_task, result.state)
        fields |= {
            "max_episode_solved": last.max_episode_solved if last else 0,
            "solved_criterion": f"error below {SOLVED_BITS_PER_ELEMENT} bits per element",
            "episode_size": "N + 3 (copy), N*R + 3 (repeat_copy), as the paper counts",
            "curriculum": [{"step": s, "episode_size": n} for s, n in curriculum],
            "final_level": {"n": last.level[0], "r": last.level[1]} if last else None,
        }
    return run_results(config, result, **fields)


def summary_lines(results: dict[str, Any]) -> list[str]:
    head = (
        f"{results['task']} {results['mode']} (T={results['truncation']}): {results['status']} "
        f"after {results['steps_done']} of {results['num_steps']} updates"
    )
    score = f"largest episode solved {results.get('max_episode_solved')}"
    if results["task"] == "char_lm" and results["test_bpc"] is None:
        score = "no validation was reached"
    elif results["task"] == "char_lm":
        score = (
            f"test {results['test_bpc']:.4f} bits per character at the best validation "
            f"({results['best_valid_bpc']:.4f}, update {results['best_step']})"
        )
    return [head, score, speed_text(results, "updates")]


def run_rnn(config: RNNConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    def prepare() -> Job:
        corpus, header = None, []
        if config.task == "char_lm":
            files = (config.text_file, config.valid_file, config.test_file)
            corpus = load_text_corpus(
                *files, valid_fraction=config.valid_fraction, test_fraction=config.test_fraction
            )
            text_streams(config, corpus)  # refuse a too-short text before writing anything
            header.append(
                f"text: {corpus.source}; {len(corpus.train)} training characters, "
                f"vocabulary {corpus.vocab_size}"
            )
        reduce = "--hidden_units, --batch_size or --max_length"
        check_memory("run", estimated_bytes(config, corpus), reduce)
        units, mode, truncation = config.hidden_units, config.mode, config.truncation
        header.append(f"core: LSTM {units} units; {mode}, truncation {truncation}")
        return Job(
            config,
            Path(config.output_dir or f"runs/rnn-{config.task}-{config.mode}"),
            header,
            METRICS_COLUMNS["char_lm" if corpus else "copy"],
            partial(state_template, config, corpus),
            partial(train_recurrent, config, corpus),
            partial(build_rnn_results, config, corpus),
            summary_lines,
            run_files=RNN_RUN_FILES,
            identity=text_identity(corpus),
            record_type=RNNRecord,
            finish=lambda results, folder: (
                results["history"] and plot_run(results, folder / "curves.png")
            ),
        )

    return run_job(prepare, resume=resume, overwrite=overwrite)


def rnn_main(fv: flags.FlagValues) -> Callable[[list[str]], int]:
    """The ``main`` of experiments/rnn.py: config from ``fv``, then one run end to end."""

    def run(argv: list[str]) -> int:
        try:
            config = RNNConfig(**{name: fv[name].value for name in CONFIG_FLAGS})
        except ConfigError as error:
            fail(str(error))
        return run_rnn(config, resume=fv.resume, overwrite=fv.overwrite)

    return run

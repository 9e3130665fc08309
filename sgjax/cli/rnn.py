"""The recurrent script's flags and main (experiments/rnn.py): one run end to end, with the
same conventions as the other scripts (results.json, metrics.csv, checkpoints, --resume,
signals, one-line errors)."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from absl import flags

from sgjax.cli.errors import fail
from sgjax.cli.run import StopRequest, claim_output_dir, device_memory_bytes, report_status
from sgjax.core.recurrent import RECURRENT_MODES
from sgjax.data.sources import DataError
from sgjax.data.text import TextCorpus, load_text_corpus
from sgjax.recurrent.config import RNN_TASKS, RNNConfig
from sgjax.recurrent.loop import (
    RNNCheckpointer,
    RNNRecord,
    RNNResume,
    RNNRunResult,
    char_lm_scores,
    text_streams,
    train_recurrent,
)
from sgjax.recurrent.plots import plot_run
from sgjax.tasks.copy import SOLVED_BITS_PER_ELEMENT
from sgjax.training.checkpoint import CheckpointError
from sgjax.training.config import ConfigError
from sgjax.training.records import OutputError, device_info, versions, write_json_atomic

_DEFAULTS = RNNConfig()
RNN_RUN_FILES = ("results.json", "metrics.csv", "curves.png", "checkpoints")
CONFIG_FLAGS = tuple(f.name for f in dataclasses.fields(RNNConfig) if f.name not in ("output_dir",))


def define_rnn_flags(fv: flags.FlagValues) -> None:
    """Define experiments/rnn.py's flags on ``fv``."""
    flags.DEFINE_enum(
        "task",
        _DEFAULTS.task,
        RNN_TASKS,
        "copy, repeat_copy (generated episodes with the paper's curriculum) or "
        "char_lm (character language modelling on --text_file).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "mode",
        _DEFAULTS.mode,
        RECURRENT_MODES,
        "bptt: truncated BPTT; dni: synthetic gradient at every segment boundary; "
        "dni_aux: dni plus the auxiliary prediction of the synthetic gradient "
        "T steps ahead.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "truncation",
        _DEFAULTS.truncation,
        "Time steps per segment (one update each).",
        flag_values=fv,
    )
    flags.DEFINE_integer("hidden_units", _DEFAULTS.hidden_units, "LSTM units.", flag_values=fv)
    flags.DEFINE_integer(
        "batch_size",
        _DEFAULTS.batch_size,
        "Episodes (copy tasks) or text streams (char_lm) per batch.",
        flag_values=fv,
    )
    flags.DEFINE_integer("num_steps", _DEFAULTS.num_steps, "Updates (segments).", flag_values=fv)
    flags.DEFINE_float(
        "learning_rate",
        _DEFAULTS.learning_rate,
        "Adam learning rate (paper: 7e-5).",
        flag_values=fv,
    )
    flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed.", flag_values=fv)
    flags.DEFINE_integer(
        "eval_every",
        None,
        "Updates between records (default: 1000 for the copy tasks, 5000 for "
        "char_lm, which scores the validation and test texts there).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "sg_scale",
        _DEFAULTS.sg_scale,
        "Factor on the synthetic gradient the core consumes (paper: 0.1).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthesizer_units",
        None,
        "Width of the synthesizer's hidden layer (default: --hidden_units).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "sg_trains_core",
        _DEFAULTS.sg_trains_core,
        "Backpropagate the synthesizer's regression loss into the core too "
        "(through the previous segment, recomputed).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "bits", _DEFAULTS.bits, "Copy tasks: bits per pattern vector.", flag_values=fv
    )
    flags.DEFINE_integer(
        "max_length",
        _DEFAULTS.max_length,
        "Copy tasks: episodes are padded to this many time steps; the "
        "curriculum stops at the largest level that fits.",
        flag_values=fv,
    )
    flags.DEFINE_string("text_file", None, "char_lm: a UTF-8 text to train on.", flag_values=fv)
    flags.DEFINE_string(
        "valid_file",
        None,
        "char_lm: validation text (default: held out from --text_file).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "test_file",
        None,
        "char_lm: test text (default: held out from --text_file).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "valid_fraction",
        _DEFAULTS.valid_fraction,
        "char_lm without --valid_file: share of --text_file held out for validation.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "test_fraction",
        _DEFAULTS.test_fraction,
        "char_lm without --test_file: share of --text_file held out for test.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "patience",
        _DEFAULTS.patience,
        "char_lm: stop after this many records without a better validation score (0: never).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "chunk_steps",
        _DEFAULTS.chunk_steps,
        "Longest compiled chunk of updates: a progress line, and a chance to "
        "stop cleanly, after each.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "checkpoint_every",
        None,
        "Updates between checkpoints, a multiple of --eval_every (default: every record; 0: none).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "output_dir", None, "Where results go (default: runs/rnn-<task>-<mode>).", flag_values=fv
    )
    flags.DEFINE_bool(
        "resume", False, "Continue from the latest checkpoint in --output_dir.", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Replace an earlier run in --output_dir.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues) -> RNNConfig:
    """The run's configuration; raises ConfigError (one line)."""
    return RNNConfig(**{name: fv[name].value for name in CONFIG_FLAGS}, output_dir=fv.output_dir)


METRICS_COLUMNS = {
    "copy": (
        "step",
        "train_bits",
        "sg_loss",
        "aux_loss",
        "level_n",
        "level_r",
        "episode_error",
        "max_episode_solved",
        "elapsed_s",
    ),
    "char_lm": ("step", "train_bits", "sg_loss", "aux_loss", "valid_bpc", "test_bpc", "elapsed_s"),
}


class RecordWriter:
    """metrics.csv: one row per record, flushed at once."""

    def __init__(self, path: Path, task: str) -> None:
        self.columns = METRICS_COLUMNS["char_lm" if task == "char_lm" else "copy"]
        self._handle: IO[str] = open(path, "w", newline="")
        self._writer = csv.writer(self._handle)
        self._writer.writerow(self.columns)
        self._handle.flush()

    def write(self, record: RNNRecord) -> None:
        values = dataclasses.asdict(record)
        level = values.pop("level") or (None, None)
        values["level_n"], values["level_r"] = level
        self._writer.writerow([_cell(values[name]) for name in self.columns])
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def build_rnn_results(
    config: RNNConfig, corpus: TextCorpus | None, result: RNNRunResult
) -> dict[str, Any]:
    """The contents of results.json."""
    last = result.records[-1] if result.records else None
    results: dict[str, Any] = {
        "task": config.task,
        "mode": config.mode,
        "status": result.status,
        "message": result.message,
        "num_steps": config.num_steps,
        "steps_done": result.steps_done,
        "seed": config.seed,
        "truncation": config.truncation,
        "network": f"LSTM {config.hidden_units} units, linear readout",
        "train_bits": last.train_bits if last else None,
        "train_time_s": result.train_time_s,
        "eval_time_s": result.eval_time_s,
        "compile_time_s": result.compile_time_s,
        "steps_per_s": result.steps_per_s,
        "device": device_info(),
        "versions": versions(),
        "config": config.to_dict(),
    }
    if config.task == "char_lm":
        assert corpus is not None
        scores = char_lm_scores(result.records)
        results |= {
            "test_bpc": scores.test_bpc,
            "best_valid_bpc": scores.best_valid_bpc,
            "best_step": scores.best_step,
            "text": {
                "source": corpus.source,
                "train_chars": len(corpus.train),
                "valid_chars": len(corpus.valid),
                "test_chars": len(corpus.test),
                "vocab_size": corpus.vocab_size,
            },
        }
    else:
        results |= {
            "max_episode_solved": last.max_episode_solved if last else 0,
            "solved_criterion": f"error below {SOLVED_BITS_PER_ELEMENT} bits per element",
            "episode_size": "N + 3 (copy), N*R + 3 (repeat_copy), as the paper counts",
            "curriculum": [{"step": s, "episode_size": n} for s, n in result.curriculum],
            "final_level": {"n": last.level[0], "r": last.level[1]} if last else None,
        }
    results["history"] = [dataclasses.asdict(r) for r in result.records]
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    head = (
        f"{results['task']} {results['mode']} (T={results['truncation']}): {results['status']} "
        f"after {results['steps_done']} of {results['num_steps']} updates"
    )
    if results["task"] == "char_lm":
        if results["test_bpc"] is None:
            score = "no validation was reached"
        else:
            score = (
                f"test {results['test_bpc']:.4f} bits per character at the best validation "
                f"({results['best_valid_bpc']:.4f}, update {results['best_step']})"
            )
    else:
        score = f"largest episode solved {results['max_episode_solved']}"
    speed = (
        f"training {results['train_time_s']:.1f} s ({results['steps_per_s']:.1f} updates/s), "
        f"compile {results['compile_time_s']:.1f} s"
    )
    return [head, score, speed]


def check_memory(config: RNNConfig, corpus: TextCorpus | None) -> None:
    """Refuse a run too big for the device (one line), before anything is written."""
    if corpus is not None:
        dims = (corpus.vocab_size, corpus.vocab_size)
    else:
        task = config.copy_task
        dims = (task.input_dim, task.output_dim)
    need, available = config.estimated_bytes(*dims), device_memory_bytes()
    if need > available:
        raise ConfigError(
            f"this run needs about {need / 2**30:.1f} GiB but the device has "
            f"{available / 2**30:.1f} GiB; reduce --hidden_units, --batch_size or --max_length"
        )


def run_rnn(config: RNNConfig, *, resume: bool = False, overwrite: bool = False) -> int:
    """Validate, load the text, train (resuming if asked), write results; the exit code."""
    try:
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
        corpus = None
        if config.task == "char_lm":
            corpus = load_text_corpus(
                config.text_file,
                config.valid_file,
                config.test_file,
                valid_fraction=config.valid_fraction,
                test_fraction=config.test_fraction,
            )
            text_streams(config, corpus)  # refuse a too-short text before writing anything
        check_memory(config, corpus)
        folder = Path(config.output_dir or f"runs/rnn-{config.task}-{config.mode}")
        output_dir = claim_output_dir(folder, resume, overwrite, RNN_RUN_FILES)
        checkpointer = RNNCheckpointer(output_dir / "checkpoints")
        start = None
        if resume:
            if checkpointer.latest_step() is None:
                print(f"no checkpoint in {checkpointer.directory}: starting from step 0")
            else:
                start = checkpointer.restore(config, corpus)
    except (ConfigError, DataError, OutputError, CheckpointError) as error:
        fail(str(error))
    if corpus is not None:
        print(
            f"text: {corpus.source}; {len(corpus.train)} training characters, "
            f"vocabulary {corpus.vocab_size}",
            flush=True,
        )
    print(
        f"core: LSTM {config.hidden_units} units; {config.mode}, truncation {config.truncation}",
        flush=True,
    )
    print(
        f"resuming from update {int(start.state.step)} in {output_dir}"
        if start
        else f"writing to {output_dir}",
        flush=True,
    )

    def save(point: RNNResume) -> None:
        checkpointer.save(point, config, corpus)

    metrics = RecordWriter(output_dir / "metrics.csv", config.task)
    try:
        for record in start.records if start else []:
            metrics.write(record)
        with StopRequest() as stop:
            result = train_recurrent(
                config,
                corpus,
                on_record=metrics.write,
                start=start,
                save_checkpoint=save if config.resolved_checkpoint_every else None,
                stop_requested=stop,
            )
    finally:
        metrics.close()
        checkpointer.close()
    results = build_rnn_results(config, corpus, result)
    write_json_atomic(output_dir / "results.json", results)
    if result.records:
        plot_run(results, output_dir / "curves.png")
    for line in summary_lines(results):
        print(line, flush=True)
    if not math.isfinite(result.train_time_s):
        return 1
    return report_status(result.status, result.message, output_dir, stop.signal)


def rnn_main(fv: flags.FlagValues) -> Callable[[list[str]], int]:
    """The ``main`` of experiments/rnn.py: config from ``fv``, then one run end to end."""

    def run(argv: list[str]) -> int:
        del argv
        try:
            config = config_from_flags(fv)
        except ConfigError as error:
            fail(str(error))
        return run_rnn(config, resume=fv.resume, overwrite=fv.overwrite)

    return run

"""experiments/rnn.py end to end: a copy run's files, character LM learning, exact resume, and
one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sgjax.cli.rnn import run_rnn
from sgjax.data.text import load_text_corpus
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.loop import (
    RNNRecord,
    char_lm_scores,
    curriculum_curve,
    state_template,
    text_identity,
    train_recurrent,
)
from sgjax.training.checkpoint import Checkpointer
from sgjax.training.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "rnn.py")


def test_a_tiny_copy_run_writes_results_and_metrics(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--task=repeat_copy", "--mode=dni_aux", "--truncation=2",
         "--hidden_units=16", "--batch_size=8", "--num_steps=60", "--eval_every=30",
         "--bits=3", "--max_length=30", "--learning_rate=1e-2", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and results["steps_done"] == 60
    assert results["task"] == "repeat_copy" and results["mode"] == "dni_aux"
    assert isinstance(results["max_episode_solved"], int)
    assert [r["step"] for r in results["history"]] == [30, 60]
    assert len(results["curriculum"]) == (results["max_episode_solved"] > 0) * len(
        results["curriculum"]
    )
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [30, 60]
    assert float(rows[-1]["aux_loss"]) > 0 and float(rows[-1]["sg_loss"]) > 0
    assert (tmp_path / "checkpoints").is_dir()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _text(tmp_path: Path) -> Path:
    # A text with structure an LSTM learns in a few hundred updates: words from a small set.
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. "]
    path = tmp_path / "text.txt"
    path.write_text("".join(rng.choice(words, 3000)))
    return path


def _config(text: Path, **kw) -> RNNConfig:
    values = dict(task="char_lm", mode="dni", truncation=4, hidden_units=32, batch_size=8,
                  num_steps=150, eval_every=50, learning_rate=3e-3, text_file=str(text),
                  patience=0)  # fmt: skip
    return RNNConfig(**(values | kw))


def _restore(checkpoints, config, corpus):
    template = state_template(config, corpus)
    extra = text_identity(corpus)
    return checkpoints.restore(config, template, extra=extra, record_type=RNNRecord)


def test_char_lm_learns_and_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    config = _config(_text(tmp_path))
    corpus = load_text_corpus(config.text_file)
    log = lambda line: None  # noqa: E731
    full = train_recurrent(config, corpus, log=log)
    bpc = [r.valid_bpc for r in full.records]
    # Uniform over the vocabulary would be log2(10) = 3.3 bits; the words' own entropy is
    # about 2.6 / 3.5 characters per word = 0.74 bits per character.
    assert bpc[0] > bpc[-1] + 0.1 and bpc[-1] < 1.2, bpc
    assert all(r.test_bpc is not None for r in full.records)

    checkpoints = Checkpointer(tmp_path / "checkpoints")
    stops = iter([True])
    first = train_recurrent(
        config, corpus, log=log, stop_requested=lambda: next(stops, False),
        save_checkpoint=lambda point: checkpoints.save(point, config, text_identity(corpus)),
    )  # fmt: skip
    assert first.status == "interrupted" and first.steps_done == 50
    start = _restore(checkpoints, config, corpus)
    rest = train_recurrent(config, corpus, log=log, start=start)
    checkpoints.close()
    assert rest.status == "completed" and rest.steps_done == 150
    assert [r.valid_bpc for r in rest.records] == bpc
    for a, b in zip(
        jax.tree_util.tree_leaves(rest.state), jax.tree_util.tree_leaves(full.state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Another seed is another run (the equality above is not vacuous).
    other = train_recurrent(_config(Path(config.text_file), seed=1, num_steps=50), corpus, log=log)
    assert other.records[0].valid_bpc != bpc[0]


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs --text_file"):
        RNNConfig(task="char_lm")
    with pytest.raises(ConfigError, match="--mode='sg'"):
        RNNConfig(mode="sg")
    with pytest.raises(ConfigError, match="--text_file, --valid_file and --test_file are for"):
        RNNConfig(task="copy", text_file="x.txt")
    with pytest.raises(ConfigError, match="max_length=3"):
        RNNConfig(task="copy", max_length=3)
    with pytest.raises(ConfigError, match="need --mode=dni or dni_aux"):
        RNNConfig(task="copy", mode="bptt", sg_trains_core=True)
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 5)
    cases = {
        _config(tmp_path / "missing.txt"): "does not exist",
        _config(short, batch_size=64): "fewer than --batch_size",
        RNNConfig(task="copy", hidden_units=200_000, output_dir=str(tmp_path / "huge")): (
            "reduce --hidden_units"
        ),
    }
    for config, words in cases.items():
        with pytest.raises(SystemExit) as stopped:
            run_rnn(config)
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "huge").exists()  # refused before anything is written


def test_a_copy_run_stopped_mid_period_resumes_to_the_uninterrupted_run(tmp_path):
    config = RNNConfig(task="repeat_copy", mode="dni", truncation=2, hidden_units=8,
                       batch_size=4, bits=2, max_length=20, num_steps=120, eval_every=60,
                       chunk_steps=30, learning_rate=1e-2)  # fmt: skip
    log = lambda line: None  # noqa: E731
    full = train_recurrent(config, log=log)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    first = train_recurrent(
        config, log=log, stop_requested=lambda: True,  # after the first chunk: mid-period
        save_checkpoint=lambda point: checkpoints.save(point, config),
    )  # fmt: skip
    assert first.status == "interrupted" and first.steps_done == 30 and not first.records
    rest = train_recurrent(config, log=log, start=_restore(checkpoints, config, None))
    checkpoints.close()

    def scores(records):  # everything but the wall-clock times
        return [(r.step, r.train_bits, r.sg_loss, r.level, r.episode_error) for r in records]

    assert scores(rest.records) == scores(full.records) and len(full.records) == 2
    curves = [curriculum_curve(config.copy_task, r.state) for r in (rest, full)]
    assert curves[0] == curves[1]
    for a, b in zip(jax.tree_util.tree_leaves(rest.state), jax.tree_util.tree_leaves(full.state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_early_stopping_scores_the_best_validation_record():
    records = [
        RNNRecord(step=s, train_bits=1.0, sg_loss=0.0, aux_loss=0.0, valid_bpc=v, test_bpc=t)
        for s, v, t in [(100, 2.0, 2.1), (200, 1.5, 1.7), (300, 1.6, 1.4), (400, 1.55, 1.3)]
    ]
    scores = char_lm_scores(records)
    # The test score where validation was best, not the best test score.
    assert (scores.best_valid_bpc, scores.best_step, scores.test_bpc) == (1.5, 200, 1.7)
    assert scores.validations_since_best == 2

"""The generated copy tasks: encoding, masks, the solved criterion, the curriculum, and one
compiled program for every episode length; text loading for character language modelling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.data.sources import DataError
from sgjax.data.text import as_streams, load_text_corpus
from sgjax.recurrent.config import RNNConfig
from sgjax.recurrent.programs import CopyProgram, level_count
from sgjax.tasks.copy import CopyTask, Level, bit_errors


def _level(n: int, r: int = 1) -> Level:
    return Level(jnp.int32(n), jnp.int32(r))


@pytest.mark.parametrize("name", ["copy", "repeat_copy"])
def test_episodes_encode_the_pattern_and_mask_the_output_phase(name):
    task = CopyTask(name, max_length=40, bits=5)
    n, r = 4, 3 if name == "repeat_copy" else 1
    episode = task.generate(jax.random.PRNGKey(0), _level(n, r), batch_size=6)
    steps = n + 2 + n * r + (1 if name == "repeat_copy" else 0)
    assert int(episode.length) == steps == task.steps(n, r)
    assert episode.inputs.shape == (40, 6, task.input_dim)
    assert episode.targets.shape == (40, 6, task.output_dim)
    inputs, targets, mask = map(np.asarray, episode[:3])
    pattern = inputs[1 : n + 1, :, :5]
    assert set(np.unique(pattern)) <= {0.0, 1.0} and pattern.std() > 0
    assert (inputs[0, :, 5] == 1).all() and (inputs[n + 1, :, 6] == 1).all()
    assert inputs[n + 2 :].sum() == 0  # nothing to read in the output phase
    np.testing.assert_array_equal(mask[:, 0], (np.arange(40) >= n + 2) & (np.arange(40) < steps))
    out = targets[n + 2 : n + 2 + n * r, :, :5]
    np.testing.assert_array_equal(out, np.concatenate([pattern] * r))
    assert targets[steps:].sum() == 0 and mask[steps:].sum() == 0
    if name == "repeat_copy":
        assert np.allclose(inputs[n + 1, :, 7], 0.3)
        assert (targets[steps - 1, :, 5] == 1).all() and targets[steps - 1, :, :5].sum() == 0
    assert task.episode_size(_level(n, r)) == n * r + 3


def test_bit_errors_count_wrong_bits_on_masked_steps():
    targets = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # [T=3, B=1, 2 bits]
    right = jnp.where(targets > 0, 5.0, -5.0)
    mask = jnp.array([[1.0], [1.0], [0.0]])
    assert float(bit_errors(right, targets, mask)[0]) == 0
    wrong = -right
    assert float(bit_errors(wrong, targets, mask)[0]) == 4  # two steps of 2 bits; last masked


def test_curriculum_steps_as_the_paper_says():
    copy, repeat = CopyTask("copy", 30), CopyTask("repeat_copy", 30)
    level, seen = copy.first_level(), []
    for _ in range(3):
        level = copy.next_level(level)
        seen.append((int(level.n), int(level.r)))
    assert seen == [(2, 1), (3, 1), (4, 1)]
    level, seen = repeat.first_level(), []
    for _ in range(4):
        level = repeat.next_level(level)
        seen.append((int(level.n), int(level.r)))
    assert seen == [(2, 1), (2, 2), (3, 2), (3, 3)]
    assert bool(copy.fits(_level(14))) and not bool(copy.fits(_level(15)))  # 2N + 2 <= 30
    assert level_count(copy) == 14


def test_the_program_solves_the_first_levels_and_advances_without_recompiling():
    config = RNNConfig(
        task="copy",
        mode="dni",
        truncation=2,
        hidden_units=24,
        batch_size=16,
        learning_rate=1e-2,
        bits=2,
        max_length=20,
        num_steps=10,
    )
    program = CopyProgram(config)
    run = jax.jit(lambda state: program.chunk(150)(state, None))
    state = jax.jit(program.init)(0)
    types = jax.eval_shape(lambda: state)
    sizes = []
    for _ in range(3):
        state, _ = run(state)
        sizes.append(int(task_size(program, state)))
        assert jax.eval_shape(lambda s=state: s) == types  # growing episodes, one program
    assert int(state.solved) >= 5  # N = 1 and N = 2 of Copy solved (sizes 4 and 5)
    assert sizes == sorted(sizes) and sizes[-1] > 4
    steps = np.asarray(state.solved_steps)
    solved = steps[steps >= 0]
    assert len(solved) >= 2 and (np.diff(solved) > 0).all()


def task_size(program, state):
    return program.task.episode_size(state.level)


def test_text_files_load_and_bad_ones_give_one_line_errors(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("abcab" * 40)
    corpus = load_text_corpus(text, valid_fraction=0.1, test_fraction=0.1)
    assert corpus.vocabulary == "abc" and corpus.vocab_size == 4
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 200
    assert len(corpus.test) == 20 and len(corpus.valid) == 18
    other = tmp_path / "valid.txt"
    other.write_text("abz")
    assert list(load_text_corpus(text, valid_file=other).valid) == [0, 1, 3]  # z: unknown
    assert as_streams(np.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = {
        tmp_path / "missing.txt": "does not exist",
        tmp_path: "is not a file",
        bad: "is not UTF-8",
        empty: "is empty",
    }
    for path, words in cases.items():
        with pytest.raises(DataError, match=words) as error:
            load_text_corpus(path)
        assert "\n" not in str(error.value)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(DataError, match="leaves no"):
        load_text_corpus(tiny)

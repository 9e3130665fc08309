"""Text for character language modelling (Penn Treebank's character version in the paper; any
UTF-8 text works): the vocabulary is the training text's characters plus one unknown id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sgjax.data.sources import DataError


class TextCorpus(NamedTuple):
    """Training, validation and test texts as character ids."""

    vocabulary: str  # the training text's characters; id len(vocabulary) is any other
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str  # which files, or which split of one file

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary) + 1


def read_text(path: str | os.PathLike, flag: str) -> str:
    """The text of ``path``; raises DataError (one line naming ``flag``) if it cannot be read."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{flag}={str(path)!r} does not exist; pass a UTF-8 text file")
    if not file.is_file():
        raise DataError(f"{flag}={str(path)!r} is not a file; pass a UTF-8 text file")
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {flag}={str(path)!r} ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{flag}={str(path)!r} is not UTF-8 text (byte {error.start}); pass a text file"
        ) from None
    if not text:
        raise DataError(f"{flag}={str(path)!r} is empty; pass a text with some characters")
    return text


def encode(text: str, vocabulary: str) -> np.ndarray:
    """Character ids of ``text``; characters outside ``vocabulary`` get the unknown id."""
    table = {c: i for i, c in enumerate(vocabulary)}
    unknown = len(vocabulary)
    return np.fromiter((table.get(c, unknown) for c in text), np.int32, len(text))


def load_text_corpus(
    text_file: str | os.PathLike,
    valid_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextCorpus:
    """Read the texts. Without ``valid_file`` (``test_file``), the last ``valid_fraction``
    (``test_fraction``) of ``text_file`` is held out: test at the end, validation before it."""
    text = read_text(text_file, "--text_file")
    total = len(text)
    valid_text = read_text(valid_file, "--valid_file") if valid_file else None
    test_text = read_text(test_file, "--test_file") if test_file else None
    held = []
    if test_text is None:
        cut = len(text) - int(round(len(text) * test_fraction))
        text, test_text = text[:cut], text[cut:]
        held.append(f"last {test_fraction:.0%} as test")
    if valid_text is None:
        cut = len(text) - int(round(len(text) * valid_fraction))
        text, valid_text = text[:cut], text[cut:]
        held.append(
            f"the {valid_fraction:.0%} before it as validation"
            if held
            else f"last {valid_fraction:.0%} as validation"
        )
    for name, part in (("validation", valid_text), ("test", test_text)):
        if not part:
            raise DataError(
                f"--text_file={str(text_file)!r} ({total} characters) leaves no {name} "
                "text; pass a longer text, a --valid_file/--test_file, or a larger fraction"
            )
    vocabulary = "".join(sorted(set(text)))
    source = f"{text_file}" + (f" ({', '.join(held)})" if held else "")
    source += (f", validation {valid_file}" if valid_file else "") + (
        f", test {test_file}" if test_file else ""
    )
    parts = (encode(t, vocabulary) for t in (text, valid_text, test_text))
    return TextCorpus(vocabulary, *parts, source)


def as_streams(ids: np.ndarray, streams: int) -> np.ndarray:
    """``[streams, len(ids) // streams]``: the text cut into contiguous streams (rest dropped)."""
    length = len(ids) // streams
    return ids[: streams * length].reshape(streams, length)

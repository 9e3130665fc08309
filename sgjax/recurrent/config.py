"""The configuration of one recurrent run, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from sgjax.core.recurrent import PAPER_SG_SCALE, RECURRENT_MODES
from sgjax.tasks.copy import COPY_TASKS, DEFAULT_BITS, CopyTask
from sgjax.training.config import ConfigError, RunConfig, require_positive

RNN_TASKS = (*COPY_TASKS, "char_lm")
TEXT_FILES = ("text_file", "valid_file", "test_file")
PAPER_RNN_LEARNING_RATE = 7e-5
# The paper validates the language model every 5k iterations.
DEFAULT_EVAL_EVERY = {"copy": 1_000, "repeat_copy": 1_000, "char_lm": 5_000}


@dataclasses.dataclass(frozen=True)
class RNNConfig(RunConfig):
    """Everything one recurrent run needs; defaults are the paper's where it gives them."""

    task: str = "copy"
    mode: str = "dni"
    truncation: int = 3
    hidden_units: int = 256
    num_steps: int = 100_000  # updates, one per segment of ``truncation`` steps
    learning_rate: float = PAPER_RNN_LEARNING_RATE
    eval_every: int | None = None  # default: DEFAULT_EVAL_EVERY
    sg_scale: float = PAPER_SG_SCALE
    synthesizer_units: int | None = None  # default: hidden_units
    sg_trains_core: bool = False
    unscaled_target: bool = False
    synthesizer_learning_rate: float | None = None  # default: learning_rate
    clip_norm: float | None = None  # each optimizer's gradient clipped to this global norm
    forget_bias: float = 0.0  # added to the LSTM's forget-gate bias at initialisation
    bits: int = DEFAULT_BITS
    max_length: int = 256  # copy tasks: episodes are padded to this many time steps
    text_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    patience: int = 5

    # The texts are checked by their sizes instead (``text_identity``).
    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, *TEXT_FILES)

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every if self.eval_every is not None else DEFAULT_EVAL_EVERY[self.task]

    @property
    def copy_task(self) -> CopyTask:
        return CopyTask(self.task, self.max_length, self.bits)

    def identity(self) -> dict:
        return super().identity() | {"model": "lstm"}

    def validate(self) -> RNNConfig:
        for name, allowed in (("task", RNN_TASKS), ("mode", RECURRENT_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        for name in ("truncation", "hidden_units", "bits", "synthesizer_units"):
            if getattr(self, name) is not None:
                require_positive(name, getattr(self, name))
        super().validate()
        for name in ("sg_scale", "synthesizer_learning_rate", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name}={value} must be a positive number")
        if not math.isfinite(self.forget_bias):
            raise ConfigError(f"--forget_bias={self.forget_bias} must be a finite number")
        if self.mode == "bptt" and (self.sg_trains_core or self.unscaled_target):
            raise ConfigError("--sg_trains_core and --unscaled_target need --mode=dni or dni_aux")
        if self.patience < 0:
            raise ConfigError(f"--patience={self.patience} must be 0 (never stop) or more")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not (0 <= value < 0.5):
                raise ConfigError(f"--{name}={value} must be at least 0 and below 0.5")
        if self.task == "char_lm":
            if not self.text_file:
                raise ConfigError(
                    "--task=char_lm needs --text_file=PATH (a UTF-8 text; e.g. Penn Treebank's "
                    "character version, or any text to try it: --text_file=README.md)"
                )
            return self
        if any(getattr(self, name) for name in TEXT_FILES):
            raise ConfigError(
                f"--text_file, --valid_file and --test_file are for --task=char_lm, not "
                f"--task={self.task} (its episodes are generated)"
            )
        try:
            _ = self.copy_task
        except ValueError as error:
            raise ConfigError(f"--{error}") from None
        if self.max_length < self.truncation:
            raise ConfigError(
                f"--max_length={self.max_length} must be at least --truncation={self.truncation}"
            )
        return self

"""One typed run configuration shared by every entry point, validated when it is built."""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

MODES = ("bp", "sg", "cdni", "bp_lambda", "dgl", "zero_grad", "stale_grad", "stale_grad_example")
PAPER_MODES = ("bp", "sg", "cdni")  # the benchmark's default --modes
SYNTHESIZER_MODES = ("sg", "cdni", "bp_lambda")  # the others' --sg_hidden_* flags are unused
LAYER_PARALLEL_MODES = ("bp", "sg", "cdni", "dgl", "zero_grad")
LAYER_PARALLEL_REFUSALS = {
    "bp_lambda": "BP(lambda) mixes in the backpropagated gradient from above, so a stage waits "
    "for the backward pass of every stage above it (it is not decoupled)",
    "stale_grad": "the stale gradient averages each layer's true gradient, which needs a "
    "backward pass through every stage above (a pipeline passes synthetic-gradient targets)",
}
LAYER_PARALLEL_REFUSALS["stale_grad_example"] = LAYER_PARALLEL_REFUSALS["stale_grad"]
MODELS = ("mlp", "cnn")
DATASETS = ("mnist", "fashion_mnist", "cifar10")
PARALLEL = ("none", "layers")
ENGINES = ("dispatch", "spmd")  # --parallel=layers: a call per stage per tick, or one program
NUM_CLASSES = 10
CONV_INPUT_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
PAPER_FILTERS = {"mnist": 64, "fashion_mnist": 64, "cifar10": 128}

PAPER_NUM_STEPS = 500_000
PAPER_LEARNING_RATE = 3e-5
PAPER_BOUNDARY_FRACTIONS = (0.6, 0.8)  # divide the rate by 10 at 300k and 400k of 500k steps
# Configuration fields that do not shape the model's network or synthesizers.
UNUSED_FIELDS = {
    "mlp": ("filters", "kernel_size", "pool_min_size"),
    "cnn": ("hidden_units", "sg_hidden_units"),
}
DEFAULT_SG_HIDDEN_LAYERS = {"sg": 2, "cdni": 0, "bp_lambda": 2}  # the paper's DNI and cDNI
MAX_STEPS = 2**31 - 1  # the step counter is an int32 on the device
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line saying what to change."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fields every run has (feed-forward and recurrent), validated when it is built."""

    num_steps: int = PAPER_NUM_STEPS
    batch_size: int = 256
    learning_rate: float = PAPER_LEARNING_RATE
    seed: int = 0
    eval_every: int | None = 10_000
    chunk_steps: int = 1_000  # longest compiled chunk: a progress line and a chance to stop
    checkpoint_every: int | None = None  # None: at every evaluation; 0: never
    output_dir: str | None = None

    # Fields that may differ on resume: they do not change what the run computes.
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("output_dir", "checkpoint_every")

    def __post_init__(self) -> None:
        self.validate()  # a config that exists is one that can run

    @property
    def resolved_eval_every(self) -> int:
        assert self.eval_every is not None
        return self.eval_every

    @property
    def resolved_checkpoint_every(self) -> int:
        every = self.checkpoint_every
        return self.resolved_eval_every if every is None else every

    def validate(self) -> RunConfig:
        """Raise ConfigError, naming the flag and a fix, for settings that cannot run."""
        for name in ("num_steps", "batch_size", "chunk_steps"):
            require_positive(name, getattr(self, name))
        if self.eval_every is not None:
            require_positive("eval_every", self.eval_every)
        if self.num_steps > MAX_STEPS:
            raise ConfigError(f"--num_steps={self.num_steps} is above the limit of {MAX_STEPS}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed={self.seed} must be between 0 and {MAX_SEED}")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):
            raise ConfigError(
                f"--learning_rate={self.learning_rate} must be a positive finite number"
            )
        every = self.checkpoint_every
        if every is not None and (every < 0 or every % self.resolved_eval_every):
            raise ConfigError(
                f"--checkpoint_every={every} must be 0 (no checkpoints) or a multiple of "
                f"--eval_every={self.resolved_eval_every}: checkpoints are taken at evaluations"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recorded(self) -> dict:
        """What results.json records of the configuration."""
        return self.to_dict()

    def identity(self) -> dict:
        """What a checkpoint records of the run, and a resume must match."""
        return {k: v for k, v in self.recorded().items() if k not in self.RESUME_FREE}


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Everything one training run needs; defaults are the paper's."""

    mode: str = "sg"
    model: str = "mlp"  # or "cnn", whose hidden_layers counts conv stages (+ the classifier)
    lr_boundaries: tuple[int, ...] | None = None
    hidden_layers: int = 3
    hidden_units: int = 256
    sg_hidden_layers: int | None = None
    sg_hidden_units: int = 1024
    filters: int | None = None  # CNN filters, the synthesizers' too (default: PAPER_FILTERS)
    kernel_size: int = 5
    pool_min_size: int = 0  # CNN stages pool only while their map is larger than this
    dataset: str = "mnist"
    data_dir: str | None = None
    eval_every: int = 10_000
    parallel: str = "none"
    num_devices: int = 0
    microbatches: int = 1
    engine: str = "dispatch"
    update_prob: float = 1.0
    bp_lambda: float = 0.5
    stale_decay: float = 0.9
    train_examples: int = 0  # stale_grad_example's rows, one per example: ``with_train_examples``
    synthetic_inputs: bool = False
    sg_warmup_steps: int = 0  # sg, cdni: steps of backprop while the synthesizers fit its gradient

    # Both layer-parallel engines compute the same schedule and name their work in flight alike;
    # the data is checked by its contents' description, not its folder.
    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, "data_dir", "engine")

    @property
    def decoupled(self) -> bool:
        return self.mode != "bp"

    @property
    def conditioned(self) -> bool:
        return self.mode == "cdni"

    @property
    def resolved_sg_hidden_layers(self) -> int:
        layers = self.sg_hidden_layers
        return DEFAULT_SG_HIDDEN_LAYERS.get(self.mode, 0) if layers is None else layers

    @property
    def resolved_lr_boundaries(self) -> tuple[int, ...]:  # the rate is divided by 10 there
        if self.lr_boundaries is not None:
            return tuple(self.lr_boundaries)
        return tuple(int(round(f * self.num_steps)) for f in PAPER_BOUNDARY_FRACTIONS)

    def validate(self) -> TrainConfig:
        choices = {"mode": MODES, "dataset": DATASETS, "model": MODELS}
        _require_choices(self, choices, lambda name: "model " if name == "model" else f"--{name}=")
        for name in ("filters", "kernel_size", "hidden_layers", "hidden_units"):
            if getattr(self, name) is not None:
                require_positive(name, getattr(self, name))
        super().validate()
        for name in ("sg_hidden_layers", "pool_min_size"):  # 0: linear modules, pool every stage
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)} is negative; use 0 or more")
        for name in ("sg_hidden_units", "microbatches"):
            require_positive(name, getattr(self, name))
        _require_choices(self, {"parallel": PARALLEL, "engine": ENGINES}, lambda name: f"--{name}=")
        if self.num_devices < 0:
            raise ConfigError(f"--num_devices={self.num_devices} must be 0 (all) or more")
        boundaries = (0, *self.resolved_lr_boundaries)
        if self.lr_boundaries is not None and not all(
            a < b < self.num_steps for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)
        ):
            raise ConfigError(
                f"--lr_boundaries={','.join(map(str, boundaries[1:]))} must be increasing steps "
                f"between 1 and --num_steps={self.num_steps} (exclusive)"
            )
        for name in ("update_prob", "bp_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name}={getattr(self, name)} must be between 0 and 1")
        if not 0.0 <= self.stale_decay < 1.0:
            raise ConfigError(f"--stale_decay={self.stale_decay} must be in [0, 1)")
        if self.synthetic_inputs and self.mode not in ("sg", "cdni"):
            raise ConfigError(
                f"--synthetic_inputs needs --mode=sg or --mode=cdni, not --mode={self.mode}"
            )
        unfit = self.mode not in ("sg", "cdni") or self.synthetic_inputs or self.parallel != "none"
        if self.sg_warmup_steps < 0 or (self.sg_warmup_steps and unfit):
            raise ConfigError(
                f"--sg_warmup_steps={self.sg_warmup_steps} must be 0, or steps of --mode=sg or "
                "cdni with --parallel=none and no --synthetic_inputs (they train by backprop)"
            )
        if self.parallel == "layers":
            if self.mode not in LAYER_PARALLEL_MODES:
                why = LAYER_PARALLEL_REFUSALS.get(self.mode, "not built for the pipeline")
                raise ConfigError(
                    f"--parallel=layers cannot run --mode={self.mode}: {why}; run it with "
                    "--parallel=none"
                )
            if self.update_prob != 1.0 and self.mode == "bp":
                raise ConfigError(
                    "--parallel=layers runs --update_prob only with decoupled modes (sg, cdni, "
                    "dgl, zero_grad); run --mode=bp with --update_prob under --parallel=none"
                )
        return self

    @property
    def uses_synthesizers(self) -> bool:
        return self.mode in SYNTHESIZER_MODES

    @property
    def resolved_filters(self) -> int:
        return self.filters if self.filters is not None else PAPER_FILTERS[self.dataset]

    def with_train_examples(self, count: int) -> TrainConfig:
        """This configuration for ``count`` training examples (only stale_grad_example uses it)."""
        if self.mode != "stale_grad_example" or self.train_examples == count:
            return self
        return dataclasses.replace(self, train_examples=int(count))

    def to_dict(self) -> dict:
        """Every field, with derived values (module depth, boundaries) filled in."""
        values = super().to_dict()
        values["sg_hidden_layers"] = self.resolved_sg_hidden_layers
        values["filters"] = self.resolved_filters
        values["lr_boundaries"] = list(self.resolved_lr_boundaries)
        return values

    def recorded(self) -> dict:
        """``to_dict()`` without the fields its model does not use (``UNUSED_FIELDS``), nor a
        zero ``sg_warmup_steps`` (so records and checkpoints from before it still match)."""
        values = self.to_dict()
        for name in UNUSED_FIELDS[self.model] + ("sg_warmup_steps",) * (not self.sg_warmup_steps):
            values.pop(name, None)
        return values


def _require_choices(config: RunConfig, choices: dict, flag) -> None:
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(
                f"unknown {flag(name)}{getattr(config, name)!r}; choose one of {', '.join(allowed)}"
            )


def require_positive(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"--{name}={value} must be a positive integer")

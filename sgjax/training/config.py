"""One typed run configuration shared by every entry point, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

from sgjax.data.sources import IMAGE_SHAPES

MODES = ("bp", "sg", "cdni", "bp_lambda", "dgl", "zero_grad", "stale_grad")
PAPER_MODES = ("bp", "sg", "cdni")
"""The paper's modes: the benchmark's default --modes."""
SYNTHESIZER_MODES = ("sg", "cdni", "bp_lambda")
"""Modes with synthetic-gradient modules (the others' --sg_hidden_* flags are unused)."""
LAYER_PARALLEL_MODES = ("bp", "sg", "cdni", "dgl", "zero_grad")
"""Modes --parallel=layers runs (bp model-parallel or GPipe, the others pipelined)."""
LAYER_PARALLEL_REFUSALS = {
    "bp_lambda": "BP(lambda) mixes in the backpropagated gradient from above, so a stage waits "
    "for the backward pass of every stage above it (it is not decoupled)",
    "stale_grad": "the stale gradient averages each layer's true gradient, which needs a "
    "backward pass through every stage above (a pipeline passes synthetic-gradient targets)",
}
"""Why --parallel=layers refuses the other modes (one line each)."""
MODELS = ("mlp", "cnn")
"""mlp: hidden blocks Dense-BN-ReLU; cnn: the paper's convolutional network (sgjax.models.cnn)."""
DATASETS = ("mnist", "fashion_mnist", "cifar10")
PARALLEL = ("none", "layers")
ENGINES = ("dispatch", "spmd")
"""How --parallel=layers runs: one call per stage per tick from the host, or one SPMD program."""
NUM_CLASSES = 10
CONV_INPUT_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
"""Height, width and channels the CNN sees (MNIST arrives flattened and is reshaped)."""
PAPER_FILTERS = {"mnist": 64, "fashion_mnist": 64, "cifar10": 128}
"""The paper's convolution filter counts: 64 for MNIST, 128 for CIFAR-10."""

PAPER_NUM_STEPS = 500_000
PAPER_LEARNING_RATE = 3e-5
PAPER_BOUNDARY_FRACTIONS = (0.6, 0.8)
"""The paper divides the learning rate by 10 at 300k and 400k of 500k steps."""

UNUSED_FIELDS = {"mlp": ("filters", "kernel_size"), "cnn": ("hidden_units", "sg_hidden_units")}
"""Configuration fields that do not shape the model's network or synthesizers."""

DEFAULT_SG_HIDDEN_LAYERS = {"sg": 2, "cdni": 0, "bp_lambda": 2}
"""DNI modules have 2 hidden layers of 1024 units; cDNI modules are linear (paper settings)."""


MAX_STEPS = 2**31 - 1
"""The step counter is an int32 on the device."""
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
    chunk_steps: int = 1_000
    """Longest compiled chunk: a progress line, and a chance to stop cleanly, after each."""
    checkpoint_every: int | None = None
    """Steps between checkpoints: None means at every evaluation, 0 means never."""
    output_dir: str | None = None

    RESUME_FREE: ClassVar[tuple[str, ...]] = ("output_dir", "checkpoint_every")
    """Fields that may differ on resume: they do not change what the run computes."""

    def __post_init__(self) -> None:
        # A config that exists is one that can run: the library refuses mode="dni" here, not
        # silently later.
        self.validate()

    @property
    def resolved_eval_every(self) -> int:
        """Steps between evaluations (records)."""
        assert self.eval_every is not None
        return self.eval_every

    @property
    def resolved_checkpoint_every(self) -> int:
        """Steps between checkpoints (0: none)."""
        if self.checkpoint_every is None:
            return self.resolved_eval_every
        return self.checkpoint_every

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
        values = self.recorded()
        for key in self.RESUME_FREE:
            values.pop(key, None)
        return values


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Everything one training run needs; defaults are the paper's."""

    mode: str = "sg"
    model: str = "mlp"
    """"mlp" or "cnn"; for the CNN ``hidden_layers`` counts its convolutional stages (the paper's
    depth is that plus the classifier)."""
    lr_boundaries: tuple[int, ...] | None = None
    hidden_layers: int = 3
    hidden_units: int = 256
    sg_hidden_layers: int | None = None
    sg_hidden_units: int = 1024
    filters: int | None = None
    """CNN filters of every convolution, the synthesizers' too (default: the paper's, 64 for
    MNIST and Fashion-MNIST, 128 for CIFAR-10)."""
    kernel_size: int = 5
    """CNN kernel size (square), the synthesizers' too."""
    dataset: str = "mnist"
    data_dir: str | None = None
    eval_every: int = 10_000
    parallel: str = "none"
    """"none": one device; "layers": every layer on its own device, pipelined."""
    num_devices: int = 0
    """Devices for --parallel=layers (0: all there are)."""
    microbatches: int = 1
    """GPipe microbatches for --parallel=layers with --mode=bp (1: plain model parallelism)."""
    engine: str = "dispatch"
    """--parallel=layers: "dispatch" (a call per stage per tick) or "spmd" (one program)."""
    update_prob: float = 1.0
    """Probability that a stage (group) updates at a step (Jaderberg et al.'s stochastic
    updates; for bp a stage updates only when every stage above ran its backward pass)."""
    bp_lambda: float = 0.5
    """--mode=bp_lambda: weight of the backpropagated gradient (1: bp, 0: DNI)."""
    stale_decay: float = 0.9
    """--mode=stale_grad: decay of each example's moving average of its past true gradients."""
    train_examples: int = 0
    """--mode=stale_grad: the training set's size (its averages keep a row per example); set
    from the loaded data (``with_train_examples``), not a flag."""
    synthetic_inputs: bool = False
    """sg and cdni: the complete unlock (every layer also trains on a synthetic input)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, "data_dir", "engine")
    """The layer-parallel engines compute the same schedule and name their work in flight
    alike; the data is checked by its contents' description, not its folder."""

    @property
    def decoupled(self) -> bool:
        """Whether the chain is decoupled (every mode but bp)."""
        return self.mode != "bp"

    @property
    def conditioned(self) -> bool:
        """Whether synthetic-gradient modules see the one-hot label (cDNI)."""
        return self.mode == "cdni"

    @property
    def resolved_sg_hidden_layers(self) -> int:
        """Module depth: the flag's value, else the paper's default for the mode."""
        if self.sg_hidden_layers is not None:
            return self.sg_hidden_layers
        return DEFAULT_SG_HIDDEN_LAYERS.get(self.mode, 0)

    @property
    def resolved_lr_boundaries(self) -> tuple[int, ...]:
        """Steps at which the learning rate is divided by 10."""
        if self.lr_boundaries is not None:
            return tuple(self.lr_boundaries)
        return tuple(int(round(f * self.num_steps)) for f in PAPER_BOUNDARY_FRACTIONS)

    def validate(self) -> TrainConfig:
        """Raise ConfigError, naming the flag and a fix, for settings that cannot run."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode={self.mode!r}; choose one of {', '.join(MODES)}")
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"unknown --dataset={self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.filters is not None:
            require_positive("filters", self.filters)
        for name in ("kernel_size", "hidden_layers", "hidden_units"):
            require_positive(name, getattr(self, name))
        super().validate()
        if self.sg_hidden_layers is not None and self.sg_hidden_layers < 0:
            raise ConfigError(
                f"--sg_hidden_layers={self.sg_hidden_layers} is negative; use 0 (linear) or more"
            )
        require_positive("sg_hidden_units", self.sg_hidden_units)
        require_positive("microbatches", self.microbatches)
        if self.parallel not in PARALLEL:
            raise ConfigError(
                f"unknown --parallel={self.parallel!r}; choose one of {', '.join(PARALLEL)}"
            )
        if self.engine not in ENGINES:
            raise ConfigError(
                f"unknown --engine={self.engine!r}; choose one of {', '.join(ENGINES)}"
            )
        if self.num_devices < 0:
            raise ConfigError(f"--num_devices={self.num_devices} must be 0 (all) or more")
        _validate_boundaries(self.resolved_lr_boundaries, self.num_steps, self.lr_boundaries)
        self._validate_decoupling()
        return self

    def _validate_decoupling(self) -> None:
        for name, value, top in (
            ("update_prob", self.update_prob, 1.0),
            ("bp_lambda", self.bp_lambda, 1.0),
        ):
            if not 0.0 <= value <= top:
                raise ConfigError(f"--{name}={value} must be between 0 and 1")
        if not 0.0 <= self.stale_decay < 1.0:
            raise ConfigError(f"--stale_decay={self.stale_decay} must be in [0, 1)")
        if self.synthetic_inputs and self.mode not in ("sg", "cdni"):
            raise ConfigError(
                f"--synthetic_inputs needs --mode=sg or --mode=cdni, not --mode={self.mode}"
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

    @property
    def uses_synthesizers(self) -> bool:
        """Whether the mode has synthetic-gradient modules (sg, cdni, bp_lambda)."""
        return self.mode in SYNTHESIZER_MODES

    @property
    def resolved_filters(self) -> int:
        """CNN filter count: the flag's value, else the paper's for the dataset."""
        return self.filters if self.filters is not None else PAPER_FILTERS[self.dataset]

    @property
    def input_dim(self) -> int:
        """Values per example as the data arrives (784 for MNIST, 3072 for CIFAR-10)."""
        return math.prod(IMAGE_SHAPES[self.dataset])

    def estimated_bytes(self) -> int:
        """Rough memory need: parameters with gradients and two Adam moments, plus activations.

        Used to refuse impossible sizes before anything is allocated; not a precise figure.
        """
        if self.model == "cnn":
            return self._estimated_cnn_bytes()
        units, hidden, inputs = self.hidden_units, self.hidden_layers, self.input_dim
        params = inputs * units + (hidden - 1) * units * units + units * NUM_CLASSES
        widths = [units] * hidden
        if self.uses_synthesizers:
            depth, width = self.resolved_sg_hidden_layers, self.sg_hidden_units
            module_in = units + (NUM_CLASSES if self.conditioned else 0)
            sizes = [module_in] + [width] * depth + [units]
            params += hidden * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            widths += [width] * depth * hidden
        activations = self.batch_size * (inputs + 8 * sum(widths))
        return 4 * (4 * params + activations)

    def _estimated_cnn_bytes(self) -> int:
        height, width, channels = CONV_INPUT_SHAPES[self.dataset]
        filters, area = self.resolved_filters, self.kernel_size**2
        params = area * channels * filters + (self.hidden_layers - 1) * area * filters**2
        maps = []  # activation sizes per example, before each stage's pooling
        for _ in range(self.hidden_layers):
            maps.append(height * width * filters)
            height, width = -(-height // 2), -(-width // 2)
        params += height * width * filters * NUM_CLASSES
        if self.uses_synthesizers:
            depth, extra = self.resolved_sg_hidden_layers, NUM_CLASSES if self.conditioned else 0
            params += self.hidden_layers * area * ((filters + extra) * filters + depth * filters**2)
            maps += [m // 4 * (depth + 1) for m in maps]
        activations = self.batch_size * (self.input_dim + 8 * sum(maps))
        return 4 * (4 * params + activations)

    def with_train_examples(self, count: int) -> TrainConfig:
        """This configuration for a training set of ``count`` examples: only the stale
        gradient's state depends on it, so every other mode is returned unchanged."""
        if self.mode != "stale_grad" or self.train_examples == count:
            return self
        return dataclasses.replace(self, train_examples=int(count))

    def stale_table_bytes(self) -> int:
        """--mode=stale_grad: bytes of its per-example averages (a float32 row per training
        example at every boundary); 0 for the other modes."""
        if self.mode != "stale_grad":
            return 0
        widths = [self.hidden_units] * self.hidden_layers
        if self.model == "cnn":
            height, width, _ = CONV_INPUT_SHAPES[self.dataset]
            widths = []
            for _ in range(self.hidden_layers):  # each hidden stage pools by 2
                height, width = -(-height // 2), -(-width // 2)
                widths.append(height * width * self.resolved_filters)
        return 4 * self.train_examples * sum(widths)

    def to_dict(self) -> dict:
        """Every field, with derived values (module depth, boundaries) filled in."""
        values = super().to_dict()
        values["sg_hidden_layers"] = self.resolved_sg_hidden_layers
        values["filters"] = self.resolved_filters
        values["lr_boundaries"] = list(self.resolved_lr_boundaries)
        return values

    def recorded(self) -> dict:
        """``to_dict()`` without the fields its model does not use (the CNN has no
        ``hidden_units``; the MLP no ``filters``): what results.json and checkpoints record."""
        values = self.to_dict()
        for name in UNUSED_FIELDS[self.model]:
            values.pop(name, None)
        return values


def require_positive(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"--{name}={value} must be a positive integer")


def _validate_boundaries(
    boundaries: Sequence[int], num_steps: int, given: Sequence[int] | None
) -> None:
    if given is None:
        return
    previous = 0
    for b in boundaries:
        if not previous < b < num_steps:
            raise ConfigError(
                f"--lr_boundaries={','.join(map(str, boundaries))} must be increasing steps "
                f"between 1 and --num_steps={num_steps} (exclusive)"
            )
        previous = b

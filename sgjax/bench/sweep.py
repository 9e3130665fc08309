"""``--sweep=name=v1,v2`` expanded into programs: the learning rate vmapped, other flags static."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import numpy as np

from sgjax.training.config import DATASETS, MODELS, MODES, ConfigError, TrainConfig

UNLOCK_MODES = ("sg_unlock", "cdni_unlock")
"""A mode with --synthetic_inputs (the complete unlock), so one benchmark shows plain and
unlocked DNI/cDNI side by side."""
BENCHMARK_MODES = (*MODES, *UNLOCK_MODES)  # what --modes accepts


def mode_fields(mode: str) -> dict[str, Any]:
    """Config fields of a benchmark method: 'cdni_unlock' -> cdni, synthetic inputs."""
    if mode in UNLOCK_MODES:
        return {"mode": mode.removesuffix("_unlock"), "synthetic_inputs": True}
    return {"mode": mode}


def benchmark_mode(config: TrainConfig) -> str:
    return f"{config.mode}_unlock" if config.synthetic_inputs else config.mode


def sweep_label(sweep: Sequence[tuple[str, Any]]) -> str:
    """' learning_rate=0.0001 hidden_units=64' (empty without sweeps)."""
    return "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in sweep)


def reads(mode: str, name: str) -> bool:
    """Whether ``mode``'s programs depend on the swept flag ``name`` (else one runs for all)."""
    stale = name != "stale_decay" or mode.startswith("stale_grad")
    return stale and (mode != "bp" or name not in SG_FIELDS)


TRACED_FIELDS = ("learning_rate",)  # swept inside one program (TrainState holds them as arrays)
STATIC_FIELDS = tuple(  # one program per value
    "model num_steps batch_size hidden_layers hidden_units sg_hidden_layers sg_hidden_units "
    "filters kernel_size pool_min_size eval_every dataset stale_decay".split()
)
SG_FIELDS = ("sg_hidden_layers", "sg_hidden_units")  # bp ignores them: it runs once for all
_FIELD_TYPES = {
    field.name: field.type
    for field in dataclasses.fields(TrainConfig)
    if field.name in TRACED_FIELDS + STATIC_FIELDS
}
_CHOICES = {"model": MODELS, "dataset": DATASETS}
_NOT_SWEPT = {
    "mode": "use --modes",
    "seed": "use --seed and --num_seeds",
    "lr_boundaries": "its values contain commas; run one command per schedule",
}


@dataclasses.dataclass(frozen=True)
class SweepAxis:
    name: str
    values: tuple[Any, ...]

    @property
    def traced(self) -> bool:
        return self.name in TRACED_FIELDS

    def describe(self) -> str:
        """The flag as it was given, e.g. ``learning_rate=1e-05,3e-05``."""
        return f"{self.name}=" + ",".join(str(v) for v in self.values)


def _parse_value(name: str, text: str, spec: str) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if "float" in str(kind):
            return float(text)
        if "int" in str(kind):
            return int(text)
    except ValueError:
        expected = "a number" if "float" in str(kind) else "an integer"
        raise ConfigError(f"--sweep={spec}: {text!r} is not {expected}") from None
    if name in _CHOICES and text not in _CHOICES[name]:
        choices = ",".join(_CHOICES[name])
        raise ConfigError(f"--sweep={spec}: {text!r} is not one of {choices}")
    return text


def parse_sweep(spec: str) -> SweepAxis:
    name, sep, values_text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(
            f"--sweep={spec} must look like name=v1,v2 (e.g. learning_rate=1e-4,3e-4)"
        )
    if name in _NOT_SWEPT:
        raise ConfigError(f"--sweep={spec}: {name} cannot be swept; {_NOT_SWEPT[name]}")
    if name not in _FIELD_TYPES:
        choices = ", ".join(TRACED_FIELDS + STATIC_FIELDS)
        raise ConfigError(f"--sweep={spec}: unknown flag {name!r}; sweepable flags: {choices}")
    texts = [t.strip() for t in values_text.split(",")]
    if not values_text.strip() or any(not t for t in texts):
        raise ConfigError(f"--sweep={spec}: give comma-separated values with none empty")
    values = tuple(_parse_value(name, t, spec) for t in texts)
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep={spec}: a value is repeated")
    return SweepAxis(name, values)


def parse_sweeps(specs: Sequence[str]) -> tuple[SweepAxis, ...]:
    axes = tuple(parse_sweep(spec) for spec in specs)
    names = [axis.name for axis in axes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"--sweep names {name} twice; give all its values in one --sweep")
    return axes


class Override(NamedTuple):
    """A preset's per-task values for the programs whose configuration matches ``when``."""

    when: tuple[tuple[str, Any], ...]
    values: tuple[tuple[str, Any], ...]

    def describe(self) -> str:
        """'model=mlp dataset=cifar10: hidden_units=1000 sg_hidden_units=4000'."""
        when = " ".join(f"{k}={v}" for k, v in self.when)
        return f"{when}: " + " ".join(f"{k}={v}" for k, v in self.values)


def apply_overrides(
    config: TrainConfig, overrides: Sequence[Override], keep: Collection[str] = ()
) -> TrainConfig:
    for override in overrides:
        if all(getattr(config, name) == value for name, value in override.when):
            values = {k: v for k, v in override.values if k not in keep}
            config = dataclasses.replace(config, **values)
    return config


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """One program: run ``i`` has ``learning_rates[i // len(seeds)], seeds[i % len(seeds)]``."""

    config: TrainConfig
    static: tuple[tuple[str, Any], ...]  # values of the statically swept flags
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    lr_swept: bool

    @property
    def num_runs(self) -> int:
        return len(self.learning_rates) * len(self.seeds)

    def run_seeds(self) -> np.ndarray:
        return np.tile(np.asarray(self.seeds, np.uint32), len(self.learning_rates))

    def run_learning_rates(self) -> np.ndarray:
        return np.repeat(np.asarray(self.learning_rates, np.float32), len(self.seeds))

    def runs_of(self, lr_index: int) -> slice:
        return slice(lr_index * len(self.seeds), (lr_index + 1) * len(self.seeds))


def plan_programs(
    base: TrainConfig,
    modes: Sequence[str],
    axes: Sequence[SweepAxis],
    seeds: Sequence[int],
    overrides: Sequence[Override] = (),
) -> list[ProgramSpec]:
    """One program per mode and static values (those it ``reads``), validated."""
    static_axes = [a for a in axes if not a.traced]
    lr_axis = next((a for a in axes if a.name == "learning_rate"), None)
    learning_rates = lr_axis.values if lr_axis else (base.learning_rate,)
    programs: list[ProgramSpec] = []
    seen: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    for mode in modes:
        for combination in itertools.product(*(a.values for a in static_axes)):
            static = tuple(
                (a.name, v)
                for a, v in zip(static_axes, combination, strict=True)
                if reads(mode, a.name)
            )
            if (mode, static) in seen:
                continue
            seen.add((mode, static))
            config = dataclasses.replace(
                base, **mode_fields(mode), learning_rate=learning_rates[0], **dict(static)
            )
            config = apply_overrides(config, overrides, keep={a.name for a in axes})
            for lr in learning_rates:
                dataclasses.replace(config, learning_rate=lr).validate()
            programs.append(
                ProgramSpec(
                    config, static, tuple(learning_rates), tuple(seeds), lr_axis is not None
                )
            )
    return programs

"""Named flag settings (set only where the command line gave none) and the paper's numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from absl import flags

from sgjax.bench.sweep import Override
from sgjax.training.config import PAPER_LEARNING_RATE, PAPER_NUM_STEPS


@dataclasses.dataclass(frozen=True)
class Preset:
    """Flag values (as absl holds them) and one line saying what they are for."""

    description: str
    values: Mapping[str, Any]
    overrides: tuple[Override, ...] = ()  # per-task values (given or swept flags win)


_PAPER_NETWORK = MappingProxyType(
    {
        "modes": ["bp", "sg", "cdni"],
        "batch_size": 256,
        "learning_rate": PAPER_LEARNING_RATE,
        # None: divided by 10 at 0.6 and 0.8 of --num_steps (300k/400k of 500k, 60k/80k of 100k).
        "lr_boundaries": None,
        "hidden_layers": 3,
        "hidden_units": 256,
        # None: the mode's module, 2x1024 for DNI (sg) and linear for cDNI (cdni).
        "sg_hidden_layers": None,
        "sg_hidden_units": 1024,
        "dataset": "mnist",
        "num_seeds": 1,
    }
)

GRID_MODES = ("bp", "sg", "cdni", "zero_grad")
"""The grid's methods; zero_grad is the control: hidden layers stay at their initialisation."""
_GRID_SWEEPS = ["model=mlp,cnn", "hidden_layers=2,3,4,5"]
"""FCN and CNN of depth 3 to 6 (hidden layers or conv stages, plus the classifier)."""
_CIFAR_FCN = (("model", "mlp"), ("dataset", "cifar10"))
_QUICK_CNN_STEPS = 1200
_QUICK_FCN_STEPS = 2000

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "paper_500k": Preset(
            "the paper's settings: 500k steps of batch 256, Adam 3e-5 divided by 10 at 300k and "
            "400k, 3x256 network, DNI modules 2x1024, cDNI linear",
            {**_PAPER_NETWORK, "num_steps": PAPER_NUM_STEPS, "eval_every": 10_000},
        ),
        "paper_100k": Preset(
            "the paper's 100k run: as paper_500k with the schedule shape kept (60k and 80k)",
            {**_PAPER_NETWORK, "num_steps": 100_000, "eval_every": 5_000},
        ),
        "quick": Preset(
            "a couple of minutes on a 2-core CPU: the paper's 3x256 network, 1x256 modules for "
            "both DNI modes (the size a PyTorch DNI library is measured at), 300 steps at 1e-3, "
            "2 seeds vmapped and run apart",
            {
                **_PAPER_NETWORK,
                "num_steps": 300,
                "learning_rate": 1e-3,
                "sg_hidden_layers": 1,
                "sg_hidden_units": 256,
                "eval_every": 50,
                "num_seeds": 2,
                "loop_steps": 50,
                "loop_repeats": 3,
            },
        ),
        "paper_grid": Preset(
            "the paper's feed-forward grid (its Table 1) for a GPU: FCN and CNN of depth 3 to 6 "
            "with bp, DNI, cDNI and the zero-gradient control (hidden layers frozen) on "
            "--dataset, 500k steps of batch 256, Adam 3e-5 divided by 10 at 60% and 80%, FCN 256 "
            "units (CIFAR-10: 1000, DNI module 1x4000), CNN filters 64 (CIFAR-10: 128), DNI "
            "modules 2 hidden layers (2x1024 or conv), cDNI linear, 3 seeds",
            {
                **{k: v for k, v in _PAPER_NETWORK.items() if k != "dataset"},  # --dataset's
                "modes": list(GRID_MODES),
                "num_steps": PAPER_NUM_STEPS,
                "eval_every": 25_000,
                "filters": None,
                "kernel_size": 5,
                "num_seeds": 3,
                "sweep": _GRID_SWEEPS,
                "loop_steps": 0,
                "compare_separate": False,
            },
            (
                Override(_CIFAR_FCN, (("hidden_units", 1000), ("sg_hidden_units", 4000))),
                Override((("mode", "sg"), *_CIFAR_FCN), (("sg_hidden_layers", 1),)),
            ),
        ),
        "paper_grid_quick": Preset(
            "paper_grid cut to about 18 minutes on a 2-core CPU: FCN "
            f"{_QUICK_FCN_STEPS} steps of batch 64 and CNN {_QUICK_CNN_STEPS} steps of batch 32 "
            "at Adam 1e-3 (divided by 10 at 60% and 80%), FCN 256 units with DNI modules 2x256, "
            "CNN 8 filters pooled down to 7x7 (no deeper), evaluated once at the end, 2 seeds",
            {
                "modes": list(GRID_MODES),
                "num_steps": _QUICK_FCN_STEPS,
                "eval_every": _QUICK_FCN_STEPS // 4,  # 4 evaluations
                "batch_size": 64,
                "learning_rate": 1e-3,
                "lr_boundaries": None,
                "hidden_units": 256,
                "sg_hidden_layers": None,
                "sg_hidden_units": 256,
                "filters": 8,
                "kernel_size": 5,
                "pool_min_size": 7,  # at 4x4 or less, frozen layers lose the digits (BUILD_NOTES)
                "num_seeds": 2,
                "sweep": _GRID_SWEEPS,
                "loop_steps": 0,
                "compare_separate": False,
            },
            (
                Override(
                    (("model", "cnn"),),
                    (
                        ("num_steps", _QUICK_CNN_STEPS),
                        ("eval_every", _QUICK_CNN_STEPS),
                        ("batch_size", 32),
                    ),
                ),
            ),
        ),
        "update_prob_sweep": Preset(
            "Jaderberg et al.'s stochastic updates: bp, DNI and cDNI, each one program of "
            "--num_seeds runs (default 100) with p uniform in [0, 1] plus p = 0.05, 0.2, 0.5, 1; "
            "sized for a 2-core CPU: 3x128 FCN, 300 steps of batch 64 at a constant Adam 1e-3, "
            "DNI modules 2x128, cDNI linear; writes update_prob.md/.json/.png",
            {
                **_PAPER_NETWORK,
                "num_steps": 300,
                "eval_every": 300,
                "batch_size": 64,
                "learning_rate": 1e-3,
                "lr_boundaries": [],
                "hidden_units": 128,
                "sg_hidden_units": 128,
                "num_seeds": 100,
            },
        ),
    }
)
SWEEP_PRESET = "update_prob_sweep"


class PaperResult(NamedTuple):
    """One row of the paper's table (GTX 1080 Ti, TensorFlow)."""

    mode: str
    num_steps: int
    test_accuracy: float
    train_time_s: float

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.train_time_s / self.num_steps


PAPER_DEVICE = "GTX 1080 Ti, TensorFlow"
PAPER_RESULTS = (
    PaperResult("bp", 500_000, 0.9763, 7290.0),
    PaperResult("sg", 500_000, 0.9580, 2497.0),
    PaperResult("bp", 100_000, 0.9781, 823.0),
    PaperResult("sg", 100_000, 0.9336, 597.0),
)


def paper_results(num_steps: int) -> tuple[PaperResult, ...]:
    return tuple(r for r in PAPER_RESULTS if r.num_steps == num_steps)


def apply_preset(flag_values: flags.FlagValues, name: str) -> None:
    """Set every flag of preset ``name`` that the command line did not give."""
    for flag_name, value in PRESETS[name].values.items():
        if flag_name in flag_values and not flag_values[flag_name].present:
            flag_values[flag_name].value = list(value) if isinstance(value, list) else value


def preset_overrides(flag_values: flags.FlagValues, name: str) -> tuple[Override, ...]:
    overrides = []
    for override in PRESETS[name].overrides:
        values = tuple(
            (k, v) for k, v in override.values if k not in flag_values or not flag_values[k].present
        )
        if values:
            overrides.append(Override(override.when, values))
    return tuple(overrides)

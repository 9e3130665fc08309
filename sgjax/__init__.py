"""sgjax: synthetic gradients (Decoupled Neural Interfaces) in JAX, benchmarked against backprop.

The layers, synthetic-gradient modules and update steps are pure functions over explicit
parameter pytrees, so they can be reused in other JAX code.
"""

from sgjax.config import ConfigError, TrainConfig
from sgjax.datasets import Dataset, load_dataset
from sgjax.layers import HiddenBlock, OutputLayer, apply_block, apply_output
from sgjax.schedules import make_optimizer, piecewise_schedule
from sgjax.steps import (
    BackpropState,
    DecoupledState,
    HiddenLayerState,
    LayerVars,
    NetworkSpec,
    activation_gradients,
    backprop_gradients,
    backprop_step,
    decoupled_gradients,
    decoupled_step,
    hidden_backward,
    hidden_forward,
    init_backprop,
    init_decoupled,
    output_backward,
)
from sgjax.synthetic import SyntheticGradient
from sgjax.train import make_train, train

__version__ = "0.1.0"

__all__ = [
    "BackpropState",
    "Dataset",
    "ConfigError",
    "DecoupledState",
    "HiddenBlock",
    "HiddenLayerState",
    "LayerVars",
    "NetworkSpec",
    "OutputLayer",
    "SyntheticGradient",
    "TrainConfig",
    "activation_gradients",
    "apply_block",
    "apply_output",
    "backprop_gradients",
    "backprop_step",
    "decoupled_gradients",
    "decoupled_step",
    "hidden_backward",
    "hidden_forward",
    "init_backprop",
    "init_decoupled",
    "load_dataset",
    "make_train",
    "make_optimizer",
    "output_backward",
    "piecewise_schedule",
    "train",
]

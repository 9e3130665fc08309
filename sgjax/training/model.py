"""The run configuration's model: the paper's MLP or CNN as a ``Trainer`` with its method."""

from __future__ import annotations

import flax.linen as nn

from sgjax.core import methods
from sgjax.core.layers import accuracy, cross_entropy
from sgjax.core.optim import adam
from sgjax.core.synthesizers import SynthesizerFactory, conv, dense
from sgjax.core.trainer import Trainer
from sgjax.data.sources import IMAGE_SHAPES
from sgjax.models.cnn import cnn_stages
from sgjax.models.mlp import mlp_stages
from sgjax.training.config import CONV_INPUT_SHAPES, NUM_CLASSES, ConfigError, TrainConfig


def stages_for(config: TrainConfig) -> list[nn.Module]:
    """The configured network as a chain of stages."""
    if config.model == "cnn":
        shape = CONV_INPUT_SHAPES[config.dataset]
        return cnn_stages(
            config.hidden_layers + 1, config.resolved_filters, kernel_size=config.kernel_size,
            input_shape=shape, num_classes=NUM_CLASSES, pool_min_size=config.pool_min_size,
        )  # fmt: skip
    return mlp_stages(config.hidden_layers, config.hidden_units, NUM_CLASSES)


def synthesizer_for(config: TrainConfig) -> SynthesizerFactory:
    depth = config.resolved_sg_hidden_layers
    if config.model == "cnn":
        return conv(depth, config.resolved_filters, config.kernel_size)
    return dense(depth, config.sg_hidden_units)


def method_for(config: TrainConfig) -> methods.Method:
    """``--mode`` as a method (the complete unlock's input models: ``--sg_hidden_units``)."""
    if not config.decoupled:
        return methods.backprop()
    if config.mode == "bp_lambda":
        return methods.bp_lambda(config.bp_lambda, synthesizer_for(config), num_classes=NUM_CLASSES)
    if config.mode == "dgl":
        return methods.dgl(num_classes=NUM_CLASSES)
    if config.mode == "zero_grad":
        return methods.zero_gradient()
    if config.mode == "stale_grad":
        return methods.stale_gradient(config.stale_decay)
    if config.mode == "stale_grad_example":
        if config.train_examples < 1:
            raise ConfigError(
                "--mode=stale_grad_example keeps a row per training example: build it with "
                "config.with_train_examples(number of training images) (the scripts do)"
            )
        return methods.per_example_stale_gradient(config.train_examples, config.stale_decay)
    return methods.dni(
        synthesizer_for(config), conditioned=config.conditioned, num_classes=NUM_CLASSES,
        synthetic_inputs=config.synthetic_inputs, input_units=config.sg_hidden_units,
        warmup_steps=config.sg_warmup_steps,
    )  # fmt: skip


def trainer_for(config: TrainConfig) -> Trainer:
    """The configured network, method and optimizer (Adam with the paper's decay)."""
    optimizer = adam(config.learning_rate, config.resolved_lr_boundaries)
    return Trainer(
        stages_for(config), method_for(config), cross_entropy, optimizer, accuracy=accuracy
    )


def sample_shape(config: TrainConfig) -> tuple[int, ...]:
    """Shape of the example batch that ``Trainer.init`` is given (only its shape matters)."""
    return (1, *IMAGE_SHAPES[config.dataset])

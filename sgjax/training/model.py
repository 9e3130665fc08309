"""The run configuration's model: the paper's MLP as a ``Trainer`` with the configured method."""

from __future__ import annotations

from sgjax.core.layers import accuracy, cross_entropy
from sgjax.core.methods import Method, backprop, dni
from sgjax.core.optim import adam
from sgjax.core.synthesizers import dense
from sgjax.core.trainer import Trainer
from sgjax.models.mlp import mlp_stages
from sgjax.training.config import INPUT_DIM, NUM_CLASSES, TrainConfig


def method_for(config: TrainConfig) -> Method:
    """``--mode`` as a method: bp -> backprop(); sg -> dni(); cdni -> dni(conditioned=True)."""
    if not config.decoupled:
        return backprop()
    synthesizer = dense(config.resolved_sg_hidden_layers, config.sg_hidden_units)
    return dni(synthesizer, conditioned=config.conditioned, num_classes=NUM_CLASSES)


def trainer_for(config: TrainConfig) -> Trainer:
    """The configured MLP, method and optimizer (Adam with the paper's decay; the initial rate is
    the config's and lives in every optimizer state)."""
    return Trainer(
        mlp_stages(config.hidden_layers, config.hidden_units, NUM_CLASSES),
        method_for(config),
        cross_entropy,
        adam(config.learning_rate, config.resolved_lr_boundaries),
        accuracy=accuracy,
    )


SAMPLE_SHAPE = (1, INPUT_DIM)
"""Shape of the example batch that ``Trainer.init`` is given (only its shape matters)."""

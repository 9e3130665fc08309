"""sgjax: synthetic gradients (Decoupled Neural Interfaces) in JAX, benchmarked against backprop.

Decouple any chain of Flax modules::

    method = sgjax.dni(sgjax.synthesizers.dense(1, 256))
    trainer = sgjax.Trainer(stages, method, loss, optax.adam(1e-3))
    state = trainer.init(key, sample_x)
    state, metrics = trainer.step(state, x, y)

Recurrent cores train segment by segment with ``sgjax.RecurrentTrainer`` (truncated BPTT,
DNI, DNI+Aux). Everything in ``sgjax.core`` is pure JAX (jit, vmap, scan, shard);
``sgjax.training`` runs the paper's MNIST MLP with checkpoints and records;
``sgjax.parallel`` places stages on devices.
"""

from sgjax.core import synthesizers
from sgjax.core.layers import HiddenBlock, OutputLayer, accuracy, cross_entropy
from sgjax.core.methods import (
    Learned,
    Method,
    Prediction,
    backprop,
    bp_lambda,
    dgl,
    dni,
    per_example_stale_gradient,
    stale_gradient,
    with_oracle,
    zero_gradient,
)
from sgjax.core.optim import adam, learning_rate_of, piecewise_schedule, with_learning_rate
from sgjax.core.recurrent import RecurrentTrainer, Segment
from sgjax.core.trainer import StageState, StepMetrics, Trainer, TrainerState
from sgjax.data import Dataset, load_dataset
from sgjax.models.lstm import LSTMCore, zero_carry

__version__ = "0.2.0"

__all__ = [
    "Learned", "Method", "Prediction", "Dataset", "HiddenBlock", "LSTMCore", "OutputLayer",
    "RecurrentTrainer", "Segment", "StageState", "StepMetrics", "Trainer", "TrainerState",
    "accuracy", "adam", "backprop", "bp_lambda", "cross_entropy", "dgl", "dni", "learning_rate_of",
    "load_dataset", "per_example_stale_gradient", "piecewise_schedule", "stale_gradient",
    "with_oracle", "synthesizers", "with_learning_rate", "zero_carry", "zero_gradient",
]  # fmt: skip

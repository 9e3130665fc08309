"""The paper's application: its configured networks (``TrainConfig``, ``trainer_for``), the run
loop and its engines, checkpoints and records; the whole run as one pure function
(``make_train``)."""

from sgjax.models.mlp import mlp_stages
from sgjax.training.config import ConfigError, TrainConfig
from sgjax.training.loop import make_train, train_and_evaluate
from sgjax.training.model import trainer_for

__all__ = [
    "ConfigError", "TrainConfig", "make_train", "mlp_stages", "train_and_evaluate", "trainer_for",
]  # fmt: skip

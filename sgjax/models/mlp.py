"""The paper's MNIST MLP as a chain of stages: n x (Dense -> BatchNorm -> ReLU), then Dense."""

from __future__ import annotations

import flax.linen as nn

from sgjax.core.layers import HiddenBlock, OutputLayer


def mlp_stages(hidden_layers: int, hidden_units: int, num_classes: int = 10) -> list[nn.Module]:
    """``hidden_layers`` hidden blocks of ``hidden_units`` units, then the output layer."""
    return [HiddenBlock(hidden_units) for _ in range(hidden_layers)] + [OutputLayer(num_classes)]

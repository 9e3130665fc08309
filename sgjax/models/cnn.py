"""The convolutional networks of Jaderberg et al. (2016, appendix) as chains of stages: d - 1
conv-BN-ReLU-pooling stages (3x3 max pooling first, then average) and a linear classifier. The
paper does not state pooling strides or the classifier's input: here every pooling has stride 2,
same padding, and the classifier reads the flattened last map (BUILD_NOTES.md says why);
``pool_min_size`` > 0 drops the pooling of stages whose map is already no larger."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from sgjax.core.conv import SameConv
from sgjax.core.layers import OutputLayer, batch_norm

POOL_WINDOW = (3, 3)
POOL_STRIDES = (2, 2)


class ConvBlock(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pooling (``max``, ``avg`` or none: ''); ``input_shape``
    (H, W, C) reshapes flat inputs (MNIST's 784 values) first."""

    filters: int
    kernel_size: int = 5
    pooling: str = "avg"
    input_shape: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.input_shape is not None:
            x = x.reshape((x.shape[0], *self.input_shape))
        # Named as nn.Conv would be, so initialisation (keyed by the path) matches it.
        conv = SameConv(self.filters, self.kernel_size, name="Conv_0")
        x = nn.relu(batch_norm(train)(conv(x)))
        pool = {"max": nn.max_pool, "avg": nn.avg_pool}.get(self.pooling)
        return x if pool is None else pool(x, POOL_WINDOW, strides=POOL_STRIDES, padding="SAME")


def cnn_stages(
    depth: int,
    filters: int,
    *,
    kernel_size: int = 5,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    pool_min_size: int = 0,
) -> list[nn.Module]:
    """``depth - 1`` convolutional stages and a linear classifier (the paper's depths: 3 to 6)."""
    if depth < 2:
        raise ValueError(f"depth={depth} must be at least 2 (a convolution and the classifier)")
    stages: list[nn.Module] = []
    size = int(input_shape[0])  # the map's side; pooling (stride 2, same padding) halves it
    for i in range(depth - 1):
        pooled = size > pool_min_size
        shape = None if i else tuple(int(d) for d in input_shape)
        stages.append(ConvBlock(filters, kernel_size, ("avg" if i else "max") * pooled, shape))
        size = -(-size // 2) if pooled else size
    return [*stages, OutputLayer(num_classes)]

"""A same-padded, stride-1 2-D convolution whose gradients stay fast inside loops on the CPU.

XLA:CPU computes a convolution's gradients 24-78x slower inside a loop body (``lax.scan``) than
outside one (jax-ml/jax#12868): its gradient convolutions lose the fast path there.
``same_conv`` writes both as ordinary channels-last convolutions (a custom VJP), which keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")


def _same_padding(size: int) -> tuple[int, int]:
    low = (size - 1) // 2
    return low, size - 1 - low


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=CHANNELS_LAST)


@jax.custom_vjp
def _conv_channels_last_grads(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _conv(x, kernel)


def _backward(residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = _same_padding(kh), _same_padding(kw)
    # Input gradient: dy correlated with the spatially flipped kernel, in/out channels swapped.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = jax.lax.conv_general_dilated(
        dy, flipped, (1, 1), [(kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)],
        dimension_numbers=CHANNELS_LAST,
    )  # fmt: skip
    # Kernel gradient: x's channels as the batch and the batch as channels, dy as the kernel.
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    dk = jax.lax.conv_general_dilated(
        padded.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), "VALID",
        dimension_numbers=CHANNELS_LAST,
    )  # fmt: skip
    return dx, dk.transpose(1, 2, 0, 3)


_conv_channels_last_grads.defvjp(lambda x, kernel: (_conv(x, kernel), (x, kernel)), _backward)


def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x`` (N, H, W, C) convolved with ``kernel`` (kh, kw, C, F), same padding, stride 1."""
    if jax.default_backend() == "cpu":
        return _conv_channels_last_grads(x, kernel)
    return _conv(x, kernel)


class SameConv(nn.Module):
    """``same_conv`` with a bias: Flax's ``nn.Conv`` for square kernels, stride 1, same
    padding (same initialisers), with loop-friendly gradients on the CPU."""

    features: int
    kernel_size: int
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return same_conv(x, kernel) + bias

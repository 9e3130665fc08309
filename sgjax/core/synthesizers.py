"""Synthesizers: modules M_k that predict dLoss/dh_k from h_k (and, for cDNI, the label).
A factory (``dense``, ``conv``) builds one per boundary for the activation's shape, called as
``module(h, context, train=...)``; its last layer starts at zero, so the first output is 0."""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgjax.core.conv import SameConv
from sgjax.core.layers import batch_norm

_zeros = nn.initializers.zeros


class SynthesizerFactory(Protocol):
    """Builds the synthesizer of one boundary for activations of ``shape`` (batch excluded)."""

    def build(self, shape: tuple[int, ...]) -> nn.Module: ...


class DenseSynthesizer(nn.Module):
    """``hidden_layers`` x (Dense -> BatchNorm -> ReLU), then a zero-initialised Dense layer, on
    the activation flattened per example (the output reshaped back)."""

    shape: tuple[int, ...]
    hidden_layers: int
    units: int

    @nn.compact
    def __call__(self, h: jax.Array, context: jax.Array | None, train: bool) -> jax.Array:
        x = h.reshape((h.shape[0], -1))
        if context is not None:
            x = jnp.concatenate([x, context.astype(x.dtype)], axis=-1)
        for _ in range(self.hidden_layers):
            x = nn.relu(batch_norm(train)(nn.Dense(self.units)(x)))
        out = nn.Dense(math.prod(self.shape), kernel_init=_zeros, bias_init=_zeros)(x)
        return out.reshape((h.shape[0], *self.shape))


@dataclasses.dataclass(frozen=True)
class Dense:
    """Factory of ``DenseSynthesizer``s."""

    hidden_layers: int = 0
    units: int = 1024

    def __post_init__(self) -> None:
        if self.hidden_layers < 0:
            raise ValueError(f"hidden_layers={self.hidden_layers} must be 0 (linear) or more")
        if self.units <= 0:
            raise ValueError(f"units={self.units} must be a positive integer")

    def build(self, shape: tuple[int, ...]) -> nn.Module:
        return DenseSynthesizer(tuple(shape), self.hidden_layers, self.units)


def dense(hidden_layers: int = 0, units: int = 1024) -> Dense:
    """Fully connected synthesizers: the paper's DNI uses ``dense(2, 1024)``, cDNI ``dense(0)``."""
    return Dense(hidden_layers, units)


class ConvSynthesizer(nn.Module):
    """``hidden_layers`` x (Conv -> BatchNorm -> ReLU), then a zero-initialised convolution to the
    activation's channels (same padding); cDNI's one-hot label enters as constant input planes."""

    channels: int
    hidden_layers: int
    filters: int
    kernel_size: int

    @nn.compact
    def __call__(self, h: jax.Array, context: jax.Array | None, train: bool) -> jax.Array:
        x = h
        if context is not None:
            planes = jnp.broadcast_to(
                context[:, None, None, :].astype(x.dtype), (*x.shape[:-1], context.shape[-1])
            )
            x = jnp.concatenate([x, planes], axis=-1)
        # Named as nn.Conv layers would be, so initialisation (keyed by the path) matches them.
        for i in range(self.hidden_layers):
            conv = SameConv(self.filters, self.kernel_size, name=f"Conv_{i}")
            x = nn.relu(batch_norm(train)(conv(x)))
        name = f"Conv_{self.hidden_layers}"
        return SameConv(self.channels, self.kernel_size, _zeros, _zeros, name=name)(x)


@dataclasses.dataclass(frozen=True)
class Conv:
    """Factory of ``ConvSynthesizer``s."""

    hidden_layers: int = 2
    filters: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.hidden_layers < 0:
            raise ValueError(f"hidden_layers={self.hidden_layers} must be 0 (linear) or more")
        if self.filters <= 0 or self.kernel_size <= 0:
            raise ValueError(
                f"filters={self.filters} and kernel_size={self.kernel_size} must be positive"
            )

    def build(self, shape: tuple[int, ...]) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(
                f"a convolutional synthesizer needs (height, width, channels) activations, got "
                f"shape {shape}; use synthesizers.dense for flat ones"
            )
        return ConvSynthesizer(shape[-1], self.hidden_layers, self.filters, self.kernel_size)


def conv(hidden_layers: int = 2, filters: int = 64, kernel_size: int = 5) -> Conv:
    """Convolutional synthesizers for (H, W, C) activations: the paper's DNI for CNNs uses
    ``conv(2, filters)``; its best cDNI results used linear ones, ``conv(0)``."""
    return Conv(hidden_layers, filters, kernel_size)


class InputModel(nn.Module):
    """A synthetic-input model (complete unlock): Dense -> ReLU -> Dense to ``shape``."""

    shape: tuple[int, ...]
    units: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        flat = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        hidden = nn.relu(nn.Dense(self.units)(flat))
        return nn.Dense(math.prod(self.shape))(hidden).reshape((x.shape[0], *self.shape))


class LinearAuxiliary(nn.Module):
    """A linear classifier on the flattened activation (DGL's head for fully connected stages)."""

    num_classes: int

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        del train
        return nn.Dense(self.num_classes)(h.reshape((h.shape[0], -1)))


class PooledAuxiliary(nn.Module):
    """DGL's head for (H, W, C) maps: average pooling to about ``pooled`` x ``pooled`` (window
    ceil(H / pooled)), ``hidden_layers`` x (Dense -> ReLU), then a linear classifier."""

    num_classes: int
    pooled: int
    hidden_layers: int
    units: int

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        del train
        window = (-(-h.shape[1] // self.pooled), -(-h.shape[2] // self.pooled))
        x = nn.avg_pool(h, window, strides=window, padding="SAME")
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.hidden_layers):
            x = nn.relu(nn.Dense(self.units)(x))
        return nn.Dense(self.num_classes)(x)


class AuxiliaryFactory(Protocol):
    """Builds a DGL auxiliary classifier for activations of ``shape`` (batch excluded)."""

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module: ...


@dataclasses.dataclass(frozen=True)
class Auxiliary:
    """Factory of DGL heads: linear for flat activations, pooled for maps."""

    pooled: int = 2
    hidden_layers: int = 0
    units: int = 256

    def __post_init__(self) -> None:
        if self.pooled <= 0 or self.units <= 0 or self.hidden_layers < 0:
            raise ValueError(
                f"pooled={self.pooled}, units={self.units} must be positive and "
                f"hidden_layers={self.hidden_layers} 0 or more"
            )

    def build(self, shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(shape) == 3:
            return PooledAuxiliary(num_classes, self.pooled, self.hidden_layers, self.units)
        return LinearAuxiliary(num_classes)


def auto_auxiliary(pooled: int = 2, hidden_layers: int = 0, units: int = 256) -> Auxiliary:
    """DGL heads: linear on flat activations, ``PooledAuxiliary`` on (H, W, C) maps."""
    return Auxiliary(pooled, hidden_layers, units)

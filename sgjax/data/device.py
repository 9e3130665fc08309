"""Device side of the data path: arrays placed on a device once, batches sampled inside jit.
Images keep the shape the host gave them; nothing here depends on it."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.data.sources import Dataset


class DeviceData(NamedTuple):
    """A dataset resident on one device: uint8 (N, ...) images as loaded, int32 (N,) labels."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array


class Batch(NamedTuple):
    """float32 images in [0, 1], int32 labels and each row's index in the training set."""

    images: jax.Array
    labels: jax.Array
    indices: jax.Array


def to_device(ds: Dataset, device: Any = None) -> DeviceData:
    """Copy the dataset's arrays to ``device`` (default device if None) in one transfer."""
    dtypes = (np.uint8, np.int32, np.uint8, np.int32)
    host = (np.asarray(getattr(ds, f), t) for f, t in zip(DeviceData._fields, dtypes, strict=True))
    return jax.device_put(DeviceData(*host), device)


def scale_images(images_uint8: jax.Array) -> jax.Array:
    """uint8 pixels 0..255 -> float32 in [0, 1], elementwise (any shape)."""
    return jnp.asarray(images_uint8).astype(jnp.float32) / jnp.float32(255.0)


@functools.partial(jax.jit, static_argnames="batch_size")
def sample_batch(key: jax.Array, data: DeviceData, batch_size: int) -> Batch:
    """``batch_size`` training examples drawn uniformly with replacement, on device."""
    n = data.train_images.shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    images = scale_images(jnp.take(data.train_images, idx, axis=0))
    labels = jnp.take(data.train_labels, idx, axis=0)
    return Batch(images=images, labels=labels, indices=idx)

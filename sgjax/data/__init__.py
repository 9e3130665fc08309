"""Data: host-side sources (IDX files, TFDS, Debian's Fashion-MNIST, the embedded MNIST subset)
and the device side (arrays placed once, batches sampled inside jit)."""

from sgjax.data.device import Batch, DeviceData, sample_batch, scale_images, to_device
from sgjax.data.sources import DataError, Dataset, load_dataset

__all__ = [
    "Batch", "DataError", "Dataset", "DeviceData", "load_dataset", "sample_batch", "scale_images",
    "to_device",
]  # fmt: skip

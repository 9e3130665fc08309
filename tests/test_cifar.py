"""sgjax.data.cifar: CIFAR-10's python version (archive, folder, flat files), its damage cases,
its place in load_dataset, and CIFAR-shaped arrays on the device side."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import tarfile
import types
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest

from sgjax.data import cifar, sources
from sgjax.data import device as data
from sgjax.data.sources import DataError

N = 20  # images per generated batch
BATCHES = (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)
PIXEL = (3, 5)  # (row, col) of the pixel given known R, G, B values in every image


# ----------------------------------------------------------------------------------------------
# writing the official format


def batch_arrays(index: int, n: int = N) -> tuple[np.ndarray, list[int]]:
    """uint8 (n, 3072) rows, channel-major, and n labels; image k of batch ``index`` is known:
    R at (0, 0) is its global id, the PIXEL is (10 + index, 20 + k, 30)."""
    rng = np.random.default_rng(index)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0] = index * n + np.arange(n)  # id of the example (< 256)
    row, col = PIXEL
    images[:, 0, row, col] = 10 + index
    images[:, 1, row, col] = 20 + np.arange(n)
    images[:, 2, row, col] = 30
    images[0, :, 1, 1], images[1, :, 1, 1] = 0, 255  # full range present
    labels = [int(x) for x in (np.arange(n) + index) % 10]
    return images.reshape(n, 3072), labels


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official files: protocol 2, every str and bytes
    as a byte string (so ``encoding="bytes"`` reads them as bytes), numpy.core module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_byte_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_byte_string
    dispatch[bytes] = save_byte_string


def batch_pickle(obj: object, protocol: int | None = None) -> bytes:
    """Pickled like the official files (``protocol=None``), or by Python 3 with ``protocol``."""
    if protocol is not None:
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    for module in ("multiarray", "numeric"):  # numpy 2 writes numpy._core, numpy 1 numpy.core
        buffer = io.BytesIO(
            buffer.getvalue().replace(
                f"cnumpy._core.{module}\n".encode(), f"cnumpy.core.{module}\n".encode()
            )
        )
    return buffer.getvalue()


def official_batch(index: int, n: int = N, protocol: int | None = None) -> bytes:
    images, labels = batch_arrays(index, n)
    return batch_pickle(
        {
            b"batch_label": f"batch {index}".encode(),
            b"labels": labels,
            b"data": images,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        },
        protocol,
    )


def batch_payloads(overrides: dict[str, bytes] | None = None) -> dict[str, bytes]:
    payloads = {name: official_batch(i) for i, name in enumerate(BATCHES)}
    payloads.update(overrides or {})
    return payloads


def write_folder(folder: Path, payloads: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in payloads.items():
        (folder / name).write_bytes(raw)
    (folder / "batches.meta").write_bytes(batch_pickle({b"label_names": list(cifar.CLASSES)}))
    return folder


def write_archive(path: Path, payloads: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in payloads.items():
            info = tarfile.TarInfo(f"{cifar.FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def expected_split(indices: range) -> tuple[np.ndarray, np.ndarray]:
    rows = [batch_arrays(i) for i in indices]
    images = np.concatenate([r[0] for r in rows]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([r[1] for r in rows]).astype(np.int32)
    return images, labels


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert isinstance(err.value, DataError), type(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A root with the three layouts: archive/, folder/ (holding cifar-10-batches-py), flat/."""
    root = tmp_path_factory.mktemp("cifar")
    payloads = batch_payloads()
    write_archive(root / "archive" / cifar.ARCHIVE, payloads)
    write_folder(root / "folder" / cifar.FOLDER, payloads)
    write_folder(root / "flat", payloads)
    return root


@pytest.fixture(scope="module")
def cifar_ds(cifar_root) -> sources.Dataset:
    return sources.load_dataset("cifar10", str(cifar_root / "archive"))


# ----------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("layout", ["archive", "folder", "flat", "archive_file"])
def test_layouts_read_the_same(cifar_root, layout):
    if layout == "archive_file":
        data_dir = cifar_root / "archive" / cifar.ARCHIVE
    else:
        data_dir = cifar_root / layout
    ds = sources.load_dataset("cifar10", str(data_dir))
    assert ds.name == "cifar10" and ds.source == "cifar"
    assert (ds.train_size, ds.test_size, ds.num_classes) == (5 * N, N, 10)
    assert ds.image_shape == (32, 32, 3)
    train_images, train_labels = expected_split(range(5))
    test_images, test_labels = expected_split(range(5, 6))
    for got, want in [
        (ds.train_images, train_images),
        (ds.train_labels, train_labels),
        (ds.test_images, test_images),
        (ds.test_labels, test_labels),
    ]:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_images.flags.c_contiguous
    assert "--data_dir was given" in ds.reason and "fewer than the official set" in ds.reason
    assert "\n" not in ds.reason
    expected_location = {
        "archive": cifar_root / "archive" / cifar.ARCHIVE,
        "archive_file": cifar_root / "archive" / cifar.ARCHIVE,
        "folder": cifar_root / "folder" / cifar.FOLDER,
        "flat": cifar_root / "flat",
    }[layout]
    assert ds.location == str(expected_location)


def test_channel_order_and_batch_order(cifar_ds):
    row, col = PIXEL
    # image k of data_batch_i sits at i * N + k of the train split: R, G, B set separately.
    for index, k in [(0, 0), (0, 7), (2, 3), (4, N - 1)]:
        pixel = cifar_ds.train_images[index * N + k, row, col]
        assert pixel.tolist() == [10 + index, 20 + k, 30]
        assert cifar_ds.train_images[index * N + k, 0, 0, 0] == index * N + k
        assert cifar_ds.train_labels[index * N + k] == (k + index) % 10
    assert cifar_ds.test_images[4, row, col].tolist() == [15, 24, 30]
    assert cifar_ds.test_labels.tolist() == [(k + 5) % 10 for k in range(N)]


def test_official_pickle_style():
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(official_batch(1, 4))]
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert ("SHORT_BINSTRING", "data") in ops  # keys as Python 2 byte strings
    assert not {"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"} & {
        n for n, _ in ops
    }


@pytest.mark.parametrize("protocol", [None, 2, 3, 4, 5])
def test_any_pickle_protocol(protocol):
    images, labels = cifar.parse_batch(official_batch(1, 4, protocol), "batch")
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == [1, 2, 3, 4]
    assert images[2, PIXEL[0], PIXEL[1]].tolist() == [11, 22, 30]


def test_labels_as_numpy_array():
    images, _ = batch_arrays(0, 3)
    raw = batch_pickle({b"data": images, b"labels": np.array([9, 0, 4], np.int64)})
    assert cifar.parse_batch(raw, "b")[1].tolist() == [9, 0, 4]


def test_dataset_describe_and_validation(cifar_ds):
    info = cifar_ds.describe()
    assert set(info) == {"name", "source", "train_size", "test_size", "reason", "location"}
    assert (info["name"], info["source"], info["train_size"]) == ("cifar10", "cifar", 5 * N)
    labels = np.zeros(2, np.int32)
    rgb, flat = np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 784), np.uint8)
    assert sources.Dataset("own", "idx", "r", rgb, labels, rgb, labels).image_shape == (32, 32, 3)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 784\);"):  # MNIST: unchanged
        sources.Dataset("mnist", "idx", "r", rgb, labels, rgb, labels)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 32, 32, 3\);"):
        sources.Dataset("cifar10", "cifar", "r", flat, labels, flat, labels)
    with pytest.raises(DataError, match="give both splits one shape"):
        sources.Dataset("own", "idx", "r", rgb, labels, flat, labels)


# ----------------------------------------------------------------------------------------------
# damage: one line naming the file, never a traceback of another type, never a hang


def test_missing_batch_file_in_folder(tmp_path):
    folder = write_folder(tmp_path / cifar.FOLDER, batch_payloads())
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError) as err:
        sources.load_dataset("cifar10", str(tmp_path))
    message = assert_one_line(err, str(folder), "data_batch_4", cifar.URL)
    assert "data_batch_3," not in message


def test_missing_batch_file_in_archive(tmp_path):
    payloads = batch_payloads()
    del payloads["test_batch"]
    archive = write_archive(tmp_path / cifar.ARCHIVE, payloads)
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, str(archive), "missing test_batch")


def test_truncated_archive(tmp_path):
    archive = write_archive(tmp_path / cifar.ARCHIVE, batch_payloads())
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, str(archive), "truncated or corrupt archive")


@pytest.mark.parametrize("payload", [b"", b"not a tar archive at all" * 10])
def test_not_an_archive(tmp_path, payload):
    archive = tmp_path / cifar.ARCHIVE
    archive.write_bytes(payload)
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, str(archive))


def damaged(name: str, raw: bytes) -> dict[str, bytes]:
    return batch_payloads({name: raw})


def rows(n: int = N, width: int = 3072, dtype: type = np.uint8) -> np.ndarray:
    return np.zeros((n, width), dtype)


DAMAGE = {
    "truncated pickle": (official_batch(2)[:-500], "data_batch_3", "not a readable"),
    "empty file": (b"", "data_batch_3", "not a readable"),
    "not a pickle": (b"\x00\x01garbage", "data_batch_3", "not a readable"),
    "a list, not a dict": (batch_pickle([1, 2, 3]), "data_batch_3", "pickled list"),
    "dict without data": (batch_pickle({b"labels": [0]}), "data_batch_3", "lacks b'data'"),
    "str keys": (
        batch_pickle({"data": rows(), "labels": [0] * N}, protocol=4),
        "data_batch_3",
        "lacks b'data' and b'labels'",
    ),
    "data not an array": (
        batch_pickle({b"data": [[0] * 3072], b"labels": [0]}),
        "data_batch_3",
        "b'data' is list",
    ),
    "data not uint8": (
        batch_pickle({b"data": rows(dtype=np.float32), b"labels": [0] * N}),
        "data_batch_3",
        "float32",
    ),
    "wrong data length": (
        batch_pickle({b"data": rows(width=3000), b"labels": [0] * N}),
        "data_batch_3",
        "3000 values, expected 3072",
    ),
    "label too large": (
        batch_pickle({b"data": rows(), b"labels": [0] * (N - 1) + [10]}),
        "test_batch",
        "label 10 out of range 0..9",
    ),
    "negative label": (
        batch_pickle({b"data": rows(), b"labels": [-1] + [0] * (N - 1)}),
        "test_batch",
        "label -1 out of range",
    ),
    "labels not ints": (
        batch_pickle({b"data": rows(), b"labels": [b"cat"] * N}),
        "test_batch",
        "not a list of ints",
    ),
    "more images than labels": (
        batch_pickle({b"data": rows(), b"labels": [0] * (N - 1)}),
        "data_batch_1",
        f"{N} images but {N - 1} labels",
    ),
    "no images": (
        batch_pickle({b"data": rows(n=0), b"labels": []}),
        "data_batch_1",
        "0 images",
    ),
    "a foreign class": (
        batch_pickle(OrderedDict({b"data": rows(), b"labels": [0] * N})),
        "data_batch_5",
        "refusing to load collections.OrderedDict",
    ),
}


@pytest.mark.parametrize("layout", ["folder", "archive"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_batch(tmp_path, layout, case):
    raw, name, what = DAMAGE[case]
    payloads = damaged(name, raw)
    if layout == "folder":
        write_folder(tmp_path, payloads)
        where = str(tmp_path / name)
    else:
        archive = write_archive(tmp_path / cifar.ARCHIVE, payloads)
        where = f"{archive} (member {cifar.FOLDER}/{name})"
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, where, what, cifar.URL)


def test_malicious_pickle_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    raw = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol 0: os.system("touch ...")
    write_folder(tmp_path, damaged("data_batch_1", raw))
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, str(tmp_path / "data_batch_1"), "refusing to load os.system")
    assert not marker.exists()


def test_train_batches_of_different_sizes(tmp_path):
    write_folder(tmp_path, damaged("data_batch_2", official_batch(1, n=N - 5)))
    with pytest.raises(DataError) as err:
        cifar.load_cifar10_dir(tmp_path)
    assert_one_line(err, str(tmp_path), f"data_batch_2 {N - 5}", f"data_batch_1 {N}")


def test_no_cifar_in_folder(tmp_path):
    with pytest.raises(DataError) as err:
        sources.load_dataset("cifar10", str(tmp_path))
    assert_one_line(err, str(tmp_path), "no CIFAR-10 found", cifar.ARCHIVE, cifar.URL)
    with pytest.raises(DataError) as err:
        sources.load_dataset("cifar10", str(tmp_path / "nope"))
    assert_one_line(err, str(tmp_path / "nope"), "does not exist")


# ----------------------------------------------------------------------------------------------
# without data_dir


def test_not_available_without_data_dir(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("TFDS or the network consulted")

    monkeypatch.setattr(sources, "_network_available", forbidden)
    monkeypatch.setattr(sources, "_load_tfds", forbidden)
    monkeypatch.setenv(sources.NO_TFDS_ENV, "1")  # as tests/conftest.py sets it
    with pytest.raises(DataError) as err:
        sources.load_dataset("cifar10", None)
    assert_one_line(
        err, "CIFAR-10 is not available", "cifar-10-python.tar.gz", cifar.URL, "--data_dir="
    )


def test_not_available_offline_with_tfds_allowed(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.NO_TFDS_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_empty"))
    monkeypatch.setattr(sources, "_network_available", lambda *a, **k: False)

    def forbidden(*args, **kwargs):
        raise AssertionError("TFDS loaded offline without a prepared copy")

    monkeypatch.setattr(sources, "_load_tfds", forbidden)
    with pytest.raises(DataError) as err:
        sources.load_dataset("cifar10", None)
    assert_one_line(err, "no prepared copy", "no network", cifar.URL)


def test_tfds_cifar10_keeps_channels_last(monkeypatch, tmp_path):
    """The TFDS path with a stand-in tensorflow_datasets module: (N, 32, 32, 3) stays as is."""
    train, labels = expected_split(range(2))
    fake = types.ModuleType("tensorflow_datasets")
    fake.load = lambda name, **kwargs: [(train, labels), (train[:5], labels[:5])]
    fake.as_numpy = lambda splits: splits
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.delenv(sources.NO_TFDS_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "_network_available", lambda *a, **k: True)
    ds = sources.load_dataset("cifar10", None)
    assert ds.source == "tfds" and ds.image_shape == (32, 32, 3) and ds.test_size == 5
    np.testing.assert_array_equal(ds.train_images, train)


# ----------------------------------------------------------------------------------------------
# device side


def test_device_sampling_keeps_shape_and_scales(cifar_ds):
    dev = data.to_device(cifar_ds)
    assert dev.train_images.shape == (5 * N, 32, 32, 3) and dev.train_images.dtype == np.uint8
    batch = data.sample_batch(jax.random.key(0), dev, 16)
    assert batch.images.shape == (16, 32, 32, 3) and batch.images.dtype == np.float32
    assert batch.labels.shape == (16,) and batch.labels.dtype == np.int32
    images = np.asarray(batch.images)
    assert images.min() >= 0.0 and images.max() <= 1.0
    ids = np.rint(images[:, 0, 0, 0] * 255).astype(int)  # R at (0, 0) is the example's id
    np.testing.assert_allclose(images, cifar_ds.train_images[ids] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.labels), cifar_ds.train_labels[ids])
    full = np.asarray(data.scale_images(dev.train_images[:2]))
    assert full.min() == 0.0 and full.max() == 1.0

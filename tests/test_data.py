"""sgjax.data.sources (host loading) and sgjax.data.device (device arrays, batch sampling)."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sgjax.data import device as data
from sgjax.data import sources as datasets
from sgjax.data.sources import DataError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers


def idx_images_bytes(images: np.ndarray) -> bytes:
    """IDX image file bytes for uint8 (N, H, W)."""
    header = np.array([datasets.IMAGES_MAGIC, *images.shape], dtype=">u4").tobytes()
    return header + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    """IDX label file bytes for (N,) labels."""
    header = np.array([datasets.LABELS_MAGIC, labels.shape[0]], dtype=">u4").tobytes()
    return header + labels.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_dir(root: Path, n_train: int = 12, n_test: int = 7, gz: bool = False, seed: int = 0):
    """Write the four IDX files into ``root``; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for key, base in datasets.IDX_FILES.items():
        encode = idx_images_bytes if key.endswith("images") else idx_labels_bytes
        write(root / base, encode(arrays[key]), gz)
    return arrays


def assert_one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    message = str(err.value)
    assert name in message, message
    assert "\n" not in message, message
    assert isinstance(err.value, ValueError)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No TFDS copy, no network, no Debian Fashion-MNIST: the offline choice, deterministic."""
    monkeypatch.delenv(datasets.NO_TFDS_ENV, raising=False)  # conftest turns TFDS off
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_empty"))
    monkeypatch.setattr(datasets, "_network_available", lambda *a, **k: False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no_debian"))


# ----------------------------------------------------------------------------------------------
# embedded MNIST and the choice of source


def test_embedded_mnist_offline(offline):
    start = time.perf_counter()
    ds = datasets.load_dataset("mnist", None)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    assert ds.source == "embedded" and ds.name == "mnist"
    assert ds.train_images.shape == (5000, 784) and ds.test_images.shape == (10000, 784)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert 0.05 < ds.train_images.mean() / 255 < 0.25  # real digits: mostly black background
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [500] * 10
    assert set(np.unique(ds.test_labels).tolist()) == set(range(10))
    assert (ds.train_size, ds.test_size, ds.num_classes) == (5000, 10000, 10)
    info = ds.describe()
    assert set(info) == {"name", "source", "train_size", "test_size", "reason", "location"}
    assert info["location"].endswith("mnist_embedded.npz")
    assert "embedded MNIST" in ds.reason and "no network" in ds.reason
    assert "\n" not in ds.reason


def test_allow_tfds_false_says_so(offline):
    ds = datasets.load_dataset("mnist", None, allow_tfds=False)
    assert ds.source == "embedded"
    assert "allow_tfds=False" in ds.reason


def test_no_tfds_import_when_offline(tmp_path):
    code = (
        "import sys; import sgjax.data.sources as d;"
        "d._network_available = lambda *a, **k: False;"
        "ds = d.load_dataset('mnist', None);"
        "assert ds.source == 'embedded', ds.source;"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'"
    )
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop(datasets.NO_TFDS_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_no_tfds_environment_variable_skips_tfds_without_a_probe(monkeypatch, tmp_path):
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # a prepared copy that must be ignored

    def forbidden(*args, **kwargs):
        raise AssertionError("TFDS path taken")

    monkeypatch.setattr(datasets, "_network_available", forbidden)
    monkeypatch.setattr(datasets, "_load_tfds", forbidden)
    monkeypatch.setenv(datasets.NO_TFDS_ENV, "1")
    ds = datasets.load_dataset("mnist", None)
    assert ds.source == "embedded"
    assert "SGJAX_NO_TFDS=1" in ds.reason
    # "0" or "" turn it back on.
    for value in ("0", ""):
        monkeypatch.setenv(datasets.NO_TFDS_ENV, value)
        with pytest.raises(AssertionError, match="TFDS path taken"):
            datasets.load_dataset("mnist", None)


def test_conftest_makes_every_test_hermetic():
    assert os.environ.get(datasets.NO_TFDS_ENV) == "1"


def test_without_tensorflow_datasets_installed(monkeypatch, tmp_path):
    """TFDS is an optional extra: with it missing, the choice falls through to the next source."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` now raises
    monkeypatch.delenv(datasets.NO_TFDS_ENV)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_network_available", lambda *a, **k: True)
    ds = datasets.load_dataset("mnist", None)
    assert ds.source == "embedded"
    assert "TFDS failed (ModuleNotFoundError" in ds.reason


def test_no_module_imports_tensorflow_datasets_when_imported():
    """Every sgjax module imports with tensorflow_datasets missing (no unguarded import)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "import sgjax\n"
        "for m in pkgutil.walk_packages(sgjax.__path__, 'sgjax.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as e:\n"
        "        assert 'tensorflow_datasets' not in repr(e), (m.name, e)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_tfds_failure_falls_through(monkeypatch, tmp_path):
    """A 'prepared copy' TFDS cannot read must not break the choice; the reason says why."""
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    monkeypatch.delenv(datasets.NO_TFDS_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_network_available", lambda *a, **k: False)

    def broken(name, download):
        assert download is False
        raise RuntimeError("no tensorflow\nsecond line")

    monkeypatch.setattr(datasets, "_load_tfds", broken)
    ds = datasets.load_dataset("mnist", None)
    assert ds.source == "embedded"
    assert "prepared copy" in ds.reason and "RuntimeError: no tensorflow second line" in ds.reason
    assert "\n" not in ds.reason


def test_tfds_success_is_used(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.NO_TFDS_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_network_available", lambda *a, **k: True)
    arrays = make_idx_dir(tmp_path)
    fake = datasets.load_idx_dir(tmp_path, "mnist")

    def fake_tfds(name, download):
        assert download is True
        return datasets.Dataset(
            name=name, source="tfds", reason="", location=str(tmp_path),
            train_images=fake.train_images, train_labels=fake.train_labels,
            test_images=fake.test_images, test_labels=fake.test_labels,
        )  # fmt: skip

    monkeypatch.setattr(datasets, "_load_tfds", fake_tfds)
    ds = datasets.load_dataset("mnist", None)
    assert ds.source == "tfds" and ds.train_size == len(arrays["train_labels"])
    assert "network answers" in ds.reason


def test_network_probe_is_bounded(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert datasets._network_available(timeout=0.1, join_timeout=0.3) is False
    assert time.perf_counter() - start < 2.0


def test_network_probe_refused_is_false():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        assert datasets._network_available(("127.0.0.1", port), 0.5, 1.0) is False


def test_fashion_mnist_debian_folder(offline, monkeypatch, tmp_path):
    debian = tmp_path / "fashion-mnist"
    debian.mkdir()
    arrays = make_idx_dir(debian, gz=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    ds = datasets.load_dataset("fashion_mnist", None)
    assert ds.source == "idx" and ds.name == "fashion_mnist" and ds.location == str(debian)
    assert "dataset-fashion-mnist" in ds.reason
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"].reshape(-1, 784))


def test_fashion_mnist_nothing_found(offline):
    with pytest.raises(DataError) as err:
        datasets.load_dataset("fashion_mnist", None)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "--data_dir" in str(err.value) and "\n" not in str(err.value)


def test_unknown_name():
    with pytest.raises(DataError) as err:
        datasets.load_dataset("imagenet", None)
    assert "imagenet" in str(err.value)
    assert "mnist" in str(err.value) and "fashion_mnist" in str(err.value)
    assert "cifar10" in str(err.value)


def test_data_dir_errors_do_not_fall_back(tmp_path):
    with pytest.raises(DataError) as err:
        datasets.load_dataset("mnist", str(tmp_path / "nope"))
    assert_one_line_naming(err, str(tmp_path / "nope"))
    assert "four MNIST-format IDX files" in str(err.value)


# ----------------------------------------------------------------------------------------------
# IDX parsing


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = datasets.load_dataset("mnist", str(tmp_path))
    assert ds.source == "idx" and ds.location == str(tmp_path)
    assert "--data_dir was given" in ds.reason
    for split in ("train", "test"):
        images = getattr(ds, f"{split}_images")
        labels = getattr(ds, f"{split}_labels")
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, arrays[f"{split}_images"].reshape(-1, 784))
        np.testing.assert_array_equal(labels, arrays[f"{split}_labels"])


def test_read_idx_direct(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    path = write(tmp_path / "imgs", idx_images_bytes(images), gz=True)
    np.testing.assert_array_equal(datasets.read_idx_images(path), images.reshape(2, 784))
    path = write(tmp_path / "labels", idx_labels_bytes(np.array([3, 9, 0])), gz=False)
    assert datasets.read_idx_labels(path).tolist() == [3, 9, 0]


def test_truncated_file(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    path = write(tmp_path / "train-images-idx3-ubyte", idx_images_bytes(images)[:-100], False)
    with pytest.raises(DataError) as err:
        datasets.read_idx_images(path)
    assert_one_line_naming(err, str(path))
    assert "truncated" in str(err.value)


def test_truncated_header(tmp_path):
    path = write(tmp_path / "t10k-labels-idx1-ubyte", b"\x00\x00\x08", True)
    with pytest.raises(DataError) as err:
        datasets.read_idx_labels(path)
    assert_one_line_naming(err, str(path))


def test_wrong_magic(tmp_path):
    labels = idx_labels_bytes(np.arange(10))
    path = write(tmp_path / "train-images-idx3-ubyte", labels, True)  # a label file in its place
    with pytest.raises(DataError) as err:
        datasets.read_idx_images(path)
    assert_one_line_naming(err, str(path))
    assert "magic" in str(err.value)


def test_wrong_image_size(tmp_path):
    header = np.array([datasets.IMAGES_MAGIC, 2, 32, 32], dtype=">u4").tobytes()
    path = write(tmp_path / "imgs", header + bytes(2 * 32 * 32), False)
    with pytest.raises(DataError) as err:
        datasets.read_idx_images(path)
    assert_one_line_naming(err, str(path))
    assert "32x32" in str(err.value)


def test_label_out_of_range(tmp_path):
    path = write(tmp_path / "train-labels-idx1-ubyte", idx_labels_bytes(np.array([1, 10])), False)
    with pytest.raises(DataError) as err:
        datasets.read_idx_labels(path)
    assert_one_line_naming(err, str(path))
    assert "10" in str(err.value)


def test_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, n_train=12)
    labels_path = write(tmp_path / "train-labels-idx1-ubyte", idx_labels_bytes(np.ones(11)), False)
    with pytest.raises(DataError) as err:
        datasets.load_idx_dir(tmp_path, "mnist")
    assert_one_line_naming(err, str(labels_path))
    assert str(tmp_path / "train-images-idx3-ubyte") in str(err.value)
    assert "12" in str(err.value) and "11" in str(err.value)


def test_missing_file(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        datasets.load_idx_dir(tmp_path, "mnist")
    assert_one_line_naming(err, "t10k-labels-idx1-ubyte")
    assert str(tmp_path) in str(err.value)
    assert "train-images" not in str(err.value).split(";")[0]  # only the missing one is listed
    assert "four MNIST-format IDX files" in str(err.value)


def test_corrupt_gzip(tmp_path):
    payload = gzip.compress(idx_labels_bytes(np.arange(10) % 10))
    corrupt = payload[:10] + bytes(b ^ 0xFF for b in payload[10:20]) + payload[20:]
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(corrupt)
    with pytest.raises(DataError) as err:
        datasets.read_idx_labels(path)
    assert_one_line_naming(err, str(path))
    assert "gzip" in str(err.value)


def test_truncated_gzip(tmp_path):
    payload = gzip.compress(idx_images_bytes(np.ones((3, 28, 28), np.uint8)))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError) as err:
        datasets.read_idx_images(path)
    assert_one_line_naming(err, str(path))


def test_dataset_rejects_wrong_dtypes():
    ok = np.zeros((2, 784), np.uint8)
    labels = np.zeros(2, np.int32)
    with pytest.raises(DataError):
        datasets.Dataset("mnist", "idx", "r", ok.astype(np.float32), labels, ok, labels)
    with pytest.raises(DataError):
        datasets.Dataset("mnist", "idx", "r", ok, labels.astype(np.int64), ok, labels)


def test_shared_t10k_equals_embedded_test_set(offline):
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"{SHARED_MNIST} absent: the shared MNIST files are not on this machine")
    images = datasets.read_idx_images(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = datasets.read_idx_labels(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 784) and labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published first labels
    embedded = datasets.load_dataset("mnist", None)
    np.testing.assert_array_equal(images, embedded.test_images)
    np.testing.assert_array_equal(labels, embedded.test_labels)


# ----------------------------------------------------------------------------------------------
# device side


@pytest.fixture(scope="module")
def small_device_data():
    rng = np.random.default_rng(1)
    n = 64
    images = rng.integers(0, 256, (n, 784), dtype=np.uint8)
    images[:, 0] = np.arange(n)  # pixel 0 identifies the example
    images[0, 1], images[1, 1] = 0, 255  # full range present
    labels = (np.arange(n) % 10).astype(np.int32)
    ds = datasets.Dataset("mnist", "idx", "test", images, labels, images[:8], labels[:8])
    return ds, data.to_device(ds)


def test_to_device(small_device_data):
    ds, dev = small_device_data
    assert isinstance(dev, data.DeviceData)
    assert dev.train_images.dtype == np.uint8 and dev.train_labels.dtype == np.int32
    assert isinstance(dev.train_images, jax.Array)
    np.testing.assert_array_equal(np.asarray(dev.train_images), ds.train_images)
    np.testing.assert_array_equal(np.asarray(dev.test_labels), ds.test_labels)


def test_scale_images():
    out = data.scale_images(np.array([[0, 51, 255]], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), [[0.0, 0.2, 1.0]], rtol=1e-6)


def test_sample_batch(small_device_data):
    ds, dev = small_device_data
    batch = data.sample_batch(jax.random.key(0), dev, 32)
    assert isinstance(batch, data.Batch)
    assert batch.images.shape == (32, 784) and batch.images.dtype == np.float32
    assert batch.labels.shape == (32,) and batch.labels.dtype == np.int32
    images = np.asarray(batch.images)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # recover each sampled example from its pixel-0 id and check image and label belong together
    ids = np.rint(images[:, 0] * 255).astype(int)
    np.testing.assert_allclose(images, ds.train_images[ids] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.labels), ds.train_labels[ids])
    assert len(set(ids.tolist())) > 10  # really sampled, not one example repeated


def test_sample_batch_determinism(small_device_data):
    _, dev = small_device_data
    a = data.sample_batch(jax.random.key(0), dev, 32)
    b = data.sample_batch(jax.random.key(0), dev, 32)
    c = data.sample_batch(jax.random.key(1), dev, 32)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))


def test_sample_batch_inside_jit(small_device_data):
    _, dev = small_device_data

    @jax.jit
    def mean_label(key, d):
        return data.sample_batch(key, d, 16).labels.astype(np.float32).mean()

    assert np.isfinite(float(mean_label(jax.random.key(3), dev)))


def test_package_exports_both_sides():
    import sgjax.data as package

    assert package.Dataset is datasets.Dataset
    assert package.DataError is datasets.DataError
    assert package.load_dataset is datasets.load_dataset
    assert package.to_device is data.to_device and package.sample_batch is data.sample_batch

"""Tests of aejax.data.splits: real offline Fashion-MNIST, tfds mock data, filters, check_images."""

import gzip
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FASHION_DIR, IDX_FILES, needs_debian

from aejax.data import offline
from aejax.data import splits as data_splits

DEBIAN_DIR = pathlib.Path(FASHION_DIR)


def read_idx(path):
    """Parses a gzip IDX file with numpy: images (N, 28, 28) or labels (N,), uint8."""
    raw = gzip.decompress(pathlib.Path(path).read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def row_keys(x, y):
    """Sorted list of (image bytes + label) per example: compares splits as multisets."""
    x = np.asarray(x).reshape(len(x), -1)
    return sorted(xi.tobytes() + int(yi).to_bytes(1, "little") for xi, yi in zip(x, y, strict=True))


def to_uint8(x):
    return np.rint(np.asarray(x) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Real Fashion-MNIST from the Debian package. Prepared once, in the default data dir
# ($AEJAX_DATA_DIR or ~/tensorflow_datasets), so later sessions skip the ~20 s preparation.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fashion_splits(fashion_data_dir):
    return data_splits.load("fashion_mnist", data_dir=fashion_data_dir)


@pytest.fixture(scope="session")
def fashion_idx():
    return {f: read_idx(DEBIAN_DIR / f) for f in IDX_FILES}


@needs_debian
def test_real_fashion_mnist_shapes_dtypes_range(fashion_splits):
    (xt, yt), (xv, yv), (xs, ys) = fashion_splits
    assert xt.shape == (55000, 28, 28, 1) and yt.shape == (55000,)
    assert xv.shape == (5000, 28, 28, 1) and yv.shape == (5000,)
    assert xs.shape == (10000, 28, 28, 1) and ys.shape == (10000,)
    for x, y in fashion_splits:
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 1.0
        data_splits.check_images(x)
    counts = np.bincount(np.concatenate([yt, yv]), minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ys, minlength=10), np.full(10, 1000))


@needs_debian
def test_real_fashion_mnist_equals_idx_files(fashion_splits, fashion_idx):
    # tfds stores examples in a hashed order, so compare as multisets of (image, label) rows; this
    # checks every pixel and every label, and that [0, 1] scaling is exactly /255.
    (xt, yt), (xv, yv), (xs, ys) = fashion_splits
    train = row_keys(np.concatenate([to_uint8(xt), to_uint8(xv)]), np.concatenate([yt, yv]))
    assert train == row_keys(
        fashion_idx["train-images-idx3-ubyte.gz"], fashion_idx["train-labels-idx1-ubyte.gz"]
    )
    test = row_keys(to_uint8(xs), ys)
    assert test == row_keys(
        fashion_idx["t10k-images-idx3-ubyte.gz"], fashion_idx["t10k-labels-idx1-ubyte.gz"]
    )
    # And a few single images, located by content, carry their IDX label.
    idx_images = fashion_idx["t10k-images-idx3-ubyte.gz"]
    where = {img.tobytes(): i for i, img in enumerate(idx_images)}
    for i in (0, 1, 4321, 9999):
        j = where[to_uint8(xs[i]).tobytes()]
        np.testing.assert_array_equal(xs[i, :, :, 0], idx_images[j] / np.float32(255))
        assert ys[i] == fashion_idx["t10k-labels-idx1-ubyte.gz"][j]


@needs_debian
def test_real_fashion_mnist_flat_matches_nhwc(fashion_data_dir, fashion_splits):
    flat = data_splits.load("fashion_mnist", flat=True, data_dir=fashion_data_dir)
    for (x, y), (xf, yf) in zip(fashion_splits, flat, strict=True):
        assert xf.shape == (len(x), 784) and xf.dtype == np.float32
        np.testing.assert_array_equal(xf, x.reshape(len(x), -1))
        np.testing.assert_array_equal(yf, y)


# --------------------------------------------------------------------------------------------------
# Unknown names; importing without tensorflow
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: data_splits.load_arrays("cifar10", "train"),
        lambda: data_splits.load("MNIST"),
    ],
)
def test_unknown_name(call):
    with pytest.raises(offline.DataError, match=r"mnist.*fashion_mnist"):
        call()


def test_import_does_not_import_tensorflow():
    code = (
        "import sys, aejax.data.splits; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------------------------------
# tfds.testing.mock_data: reading, splitting and filtering without real files or network
# --------------------------------------------------------------------------------------------------

MOCK_N = 300


@pytest.fixture
def mock_tfds(monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(*args, **kwargs):
        raise AssertionError("mock data must not probe the network")

    monkeypatch.setattr(offline, "_network_available", no_network)
    with tfds.testing.mock_data(num_examples=MOCK_N):
        yield


def test_mock_load_arrays(mock_tfds, tmp_path):
    x, y = data_splits.load_arrays("mnist", "train", data_dir=str(tmp_path))
    assert x.shape == (MOCK_N, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (MOCK_N,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() <= 9
    assert not (tmp_path / ".aejax-arrays").exists()  # mock reads are never kept
    with pytest.raises(offline.DataError, match="split"):
        data_splits.load_arrays("mnist", "validation", data_dir=str(tmp_path))


def test_mock_validation_split_is_seeded(mock_tfds, tmp_path):
    x, y = data_splits.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))
    original = row_keys(x, y)
    assert (
        len(set(original)) == MOCK_N
    )  # Random mock images are distinct, so rows identify examples.
    a = data_splits.load("fashion_mnist", validation_size=60, seed=1, data_dir=str(tmp_path))
    b = data_splits.load("fashion_mnist", validation_size=60, seed=1, data_dir=str(tmp_path))
    c = data_splits.load("fashion_mnist", validation_size=60, seed=2, data_dir=str(tmp_path))
    for split_a, split_b in zip(a, b, strict=True):
        np.testing.assert_array_equal(split_a[0], split_b[0])
        np.testing.assert_array_equal(split_a[1], split_b[1])
    assert not np.array_equal(a.validation[0], c.validation[0])
    (xt, yt), (xv, yv), (xs, ys) = a
    assert len(xt) == MOCK_N - 60 and len(xv) == 60 and len(xs) == MOCK_N
    train_rows, val_rows = row_keys(to_uint8(xt), yt), row_keys(to_uint8(xv), yv)
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == original
    fraction = data_splits.load("fashion_mnist", validation_size=0.1, data_dir=str(tmp_path))
    assert len(fraction.validation[0]) == 30 and len(fraction.train[0]) == 270


def test_mock_classes_filter(mock_tfds, tmp_path):
    splits = data_splits.load(
        "mnist", validation_size=10, classes=(1, 5, 6), flat=True, data_dir=str(tmp_path)
    )
    _, y_all = data_splits.load_arrays("mnist", "train", data_dir=str(tmp_path))
    for x, y in splits:
        assert set(np.unique(y)) == {1, 5, 6}  # Original label values, all three present.
        assert x.shape == (len(y), 784)
    assert len(splits.train[1]) + len(splits.validation[1]) == np.isin(y_all, (1, 5, 6)).sum()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(validation_size=0.0),
        dict(validation_size=1.0),
        dict(validation_size=MOCK_N),
        dict(validation_size=-1),
        dict(validation_size=True),
        dict(validation_size="10"),
        dict(classes=()),
        dict(classes=(10,)),
        dict(classes=(-1, 2)),
        dict(classes=("1",)),
        dict(seed=1.5),
    ],
)
def test_load_rejects_bad_arguments(mock_tfds, tmp_path, kwargs):
    with pytest.raises(offline.DataError):
        data_splits.load("mnist", data_dir=str(tmp_path), **kwargs)


def test_load_empty_class_filter(monkeypatch):
    fake = (np.zeros((20, 28, 28, 1), np.uint8), np.arange(20, dtype=np.int32) % 5)
    monkeypatch.setattr(data_splits, "load_arrays", lambda *args, **kwargs: fake)
    with pytest.raises(offline.DataError, match="No training examples"):
        data_splits.load("mnist", classes=(7,), validation_size=2)
    splits = data_splits.load("mnist", classes=(0, 4), validation_size=2)
    assert set(splits.train[1]) | set(splits.validation[1]) == {0, 4}


# --------------------------------------------------------------------------------------------------
# check_images
# --------------------------------------------------------------------------------------------------


def test_check_images():
    data_splits.check_images(np.linspace(0, 1, 10, dtype=np.float32))
    data_splits.check_images(jnp.zeros((2, 3), jnp.bfloat16))
    with pytest.raises(offline.DataError, match=r"dtype uint8.*255"):
        data_splits.check_images(np.zeros(3, np.uint8))
    with pytest.raises(offline.DataError, match="NaN"):
        data_splits.check_images(np.array([0.5, np.nan], np.float32))
    with pytest.raises(offline.DataError, match="NaN or inf"):
        data_splits.check_images(np.array([0.5, np.inf], np.float32))
    with pytest.raises(offline.DataError, match=r"batch has values in \[0.0, 255.0\].*255"):
        data_splits.check_images(np.array([0.0, 255.0], np.float32), name="batch")
    with pytest.raises(offline.DataError, match=r"\[-0.5, 0.5\]"):
        data_splits.check_images(np.array([-0.5, 0.5], np.float32))

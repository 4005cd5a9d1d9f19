"""Tests of aejax.data: real offline Fashion-MNIST, tfds mock data, the device-resident helpers."""

import gzip
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aejax import data

DEBIAN_DIR = pathlib.Path(data.DEBIAN_FASHION_MNIST_DIR)
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
needs_debian = pytest.mark.skipif(
    not all((DEBIAN_DIR / f).is_file() for f in IDX_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR}); "
    "`apt-get install dataset-fashion-mnist` to run the real-data tests",
)


def tfds_checksums(name):
    """File name -> (size, sha256), parsed straight from the installed tfds' url_checksums file."""
    import tensorflow_datasets as tfds

    path = pathlib.Path(tfds.__file__).parent / "url_checksums" / f"{name}.txt"
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            _url, size, sha, filename = line.split("\t")
            out[filename] = (int(size), sha)
    return out


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
def fashion_data_dir():
    if not all((DEBIAN_DIR / f).is_file() for f in IDX_FILES):
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({DEBIAN_DIR})")
    return data.prepare("fashion_mnist")


@pytest.fixture(scope="session")
def fashion_splits(fashion_data_dir):
    return data.load("fashion_mnist", data_dir=fashion_data_dir)


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
        data.check_images(x)
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
    flat = data.load("fashion_mnist", flat=True, data_dir=fashion_data_dir)
    for (x, y), (xf, yf) in zip(fashion_splits, flat, strict=True):
        assert xf.shape == (len(x), 784) and xf.dtype == np.float32
        np.testing.assert_array_equal(xf, x.reshape(len(x), -1))
        np.testing.assert_array_equal(yf, y)


@needs_debian
def test_staged_gzip_files_match_tfds_checksums(tmp_path):
    cache = tmp_path / "cache"
    import tensorflow_datasets as tfds

    data._stage_manual_files("fashion_mnist", DEBIAN_DIR, cache, tfds)
    expected = tfds_checksums("fashion_mnist")
    assert sorted(expected) == sorted(IDX_FILES)
    for filename, (size, sha) in expected.items():
        staged = (cache / filename).read_bytes()
        assert len(staged) == size
        assert hashlib.sha256(staged).hexdigest() == sha
        # Same content as Debian's file: only the gzip header was rebuilt.
        assert gzip.decompress(staged) == gzip.decompress((DEBIAN_DIR / filename).read_bytes())
    # Files already identical to upstream are accepted as they are.
    again = tmp_path / "again"
    data._stage_manual_files("fashion_mnist", cache, again, tfds)
    for filename in IDX_FILES:
        assert (again / filename).read_bytes() == (cache / filename).read_bytes()


@needs_debian
def test_tampered_file_raises_checksum_error(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for f in IDX_FILES:
        shutil.copy(DEBIAN_DIR / f, manual / f)
    raw = bytearray((manual / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[100] ^= 0xFF  # Inside the deflate stream: header rebuilding cannot repair it.
    (manual / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(
        data.DataError, match=r"(?s)Checksum mismatch.*t10k-labels-idx1-ubyte\.gz.*expected sha256"
    ):
        data.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    assert not (tmp_path / "tfds" / "fashion_mnist").exists()  # Nothing was prepared.


def test_manual_dir_missing_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.prepare("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Offline failures and the network probe
# --------------------------------------------------------------------------------------------------


def test_mnist_without_network_or_files_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_network_available", lambda *args, **kwargs: False)
    start = time.monotonic()
    with pytest.raises(data.DataError) as err:
        data.load("mnist", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "manual_dir" in msg and "internet" in msg and "storage.googleapis.com" in msg


def test_fashion_mnist_without_debian_package_names_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_network_available", lambda *args, **kwargs: False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"))


def test_network_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert data._network_available("127.0.0.1", port, timeout=2.0, tls=False)
        # Accepts connections but never answers the TLS handshake (like a transparent proxy that
        # goes nowhere): unreachable, and the probe returns within its timeout.
        start = time.monotonic()
        assert not data._network_available("127.0.0.1", port, timeout=0.5, tls=True)
        assert time.monotonic() - start < 1.5
    with socket.socket() as s:  # A port nobody listens on once closed.
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert not data._network_available("127.0.0.1", closed_port, timeout=2.0, tls=False)
    assert not data._network_available("no-such-host.invalid", 443, timeout=2.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.prepare("cifar10"),
        lambda: data.load_arrays("cifar10", "train"),
        lambda: data.load("MNIST"),
    ],
)
def test_unknown_name(call):
    with pytest.raises(data.DataError, match=r"mnist.*fashion_mnist"):
        call()


def test_import_does_not_import_tensorflow():
    code = "import sys, aejax.data; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
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

    monkeypatch.setattr(data, "_network_available", no_network)
    with tfds.testing.mock_data(num_examples=MOCK_N):
        yield


def test_mock_load_arrays(mock_tfds, tmp_path):
    x, y = data.load_arrays("mnist", "train", data_dir=str(tmp_path))
    assert x.shape == (MOCK_N, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (MOCK_N,) and y.dtype == np.int32
    assert 0 <= y.min() and y.max() <= 9
    with pytest.raises(data.DataError, match="split"):
        data.load_arrays("mnist", "validation", data_dir=str(tmp_path))


def test_mock_validation_split_is_seeded(mock_tfds, tmp_path):
    x, y = data.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))
    original = row_keys(x, y)
    assert (
        len(set(original)) == MOCK_N
    )  # Random mock images are distinct, so rows identify examples.
    a = data.load("fashion_mnist", validation_size=60, seed=1, data_dir=str(tmp_path))
    b = data.load("fashion_mnist", validation_size=60, seed=1, data_dir=str(tmp_path))
    c = data.load("fashion_mnist", validation_size=60, seed=2, data_dir=str(tmp_path))
    for split_a, split_b in zip(a, b, strict=True):
        np.testing.assert_array_equal(split_a[0], split_b[0])
        np.testing.assert_array_equal(split_a[1], split_b[1])
    assert not np.array_equal(a.validation[0], c.validation[0])
    (xt, yt), (xv, yv), (xs, ys) = a
    assert len(xt) == MOCK_N - 60 and len(xv) == 60 and len(xs) == MOCK_N
    train_rows, val_rows = row_keys(to_uint8(xt), yt), row_keys(to_uint8(xv), yv)
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == original
    fraction = data.load("fashion_mnist", validation_size=0.1, data_dir=str(tmp_path))
    assert len(fraction.validation[0]) == 30 and len(fraction.train[0]) == 270


def test_mock_classes_filter(mock_tfds, tmp_path):
    splits = data.load(
        "mnist", validation_size=10, classes=(1, 5, 6), flat=True, data_dir=str(tmp_path)
    )
    _, y_all = data.load_arrays("mnist", "train", data_dir=str(tmp_path))
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
    with pytest.raises(data.DataError):
        data.load("mnist", data_dir=str(tmp_path), **kwargs)


def test_load_empty_class_filter(monkeypatch):
    fake = (np.zeros((20, 28, 28, 1), np.uint8), np.arange(20, dtype=np.int32) % 5)
    monkeypatch.setattr(data, "load_arrays", lambda *args, **kwargs: fake)
    with pytest.raises(data.DataError, match="No training examples"):
        data.load("mnist", classes=(7,), validation_size=2)
    splits = data.load("mnist", classes=(0, 4), validation_size=2)
    assert set(splits.train[1]) | set(splits.validation[1]) == {0, 4}


# --------------------------------------------------------------------------------------------------
# check_images, binarize
# --------------------------------------------------------------------------------------------------


def test_check_images():
    data.check_images(np.linspace(0, 1, 10, dtype=np.float32))
    data.check_images(jnp.zeros((2, 3), jnp.bfloat16))
    with pytest.raises(data.DataError, match=r"dtype uint8.*255"):
        data.check_images(np.zeros(3, np.uint8))
    with pytest.raises(data.DataError, match="NaN"):
        data.check_images(np.array([0.5, np.nan], np.float32))
    with pytest.raises(data.DataError, match="NaN or inf"):
        data.check_images(np.array([0.5, np.inf], np.float32))
    with pytest.raises(data.DataError, match=r"batch has values in \[0.0, 255.0\].*255"):
        data.check_images(np.array([0.0, 255.0], np.float32), name="batch")
    with pytest.raises(data.DataError, match=r"\[-0.5, 0.5\]"):
        data.check_images(np.array([-0.5, 0.5], np.float32))


def test_binarize():
    x = jnp.full((200_000,), 0.3, jnp.float32)
    b = jax.jit(data.binarize)(jax.random.key(0), x)
    assert b.dtype == jnp.float32 and b.shape == x.shape
    assert set(np.unique(np.asarray(b))) == {0.0, 1.0}
    assert abs(float(b.mean()) - 0.3) < 0.01  # Standard error of the mean is about 0.001.
    xs = jnp.linspace(0, 1, 7)
    np.testing.assert_array_equal(
        data.binarize(jax.random.key(1), jnp.array([0.0, 1.0])), [0.0, 1.0]
    )
    assert not np.array_equal(
        data.binarize(jax.random.key(1), x), data.binarize(jax.random.key(2), x)
    )
    assert data.binarize(jax.random.key(0), xs.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------------
# Device-resident helpers
# --------------------------------------------------------------------------------------------------


def test_epoch_permutation():
    rng = jax.random.key(3)
    p0 = data.epoch_permutation(rng, 1000, 0)
    np.testing.assert_array_equal(np.sort(p0), np.arange(1000))
    np.testing.assert_array_equal(p0, data.epoch_permutation(rng, 1000, 0))  # A resumed run agrees.
    assert not np.array_equal(p0, data.epoch_permutation(rng, 1000, 1))
    jitted = jax.jit(data.epoch_permutation, static_argnums=1)
    np.testing.assert_array_equal(
        jitted(rng, 1000, jnp.int32(1)), data.epoch_permutation(rng, 1000, 1)
    )


def test_take_batch_matches_numpy_and_compiles_once():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    perm = data.epoch_permutation(jax.random.key(0), 50, 0)
    traces = []

    def take(x, perm, index):
        traces.append(1)
        return data.take_batch(x, perm, index, 8)

    take = jax.jit(take)
    steps = data.steps_per_epoch(50, 8)
    assert steps == 6
    seen = []
    for i in range(steps):
        batch = take(x, perm, i)
        np.testing.assert_array_equal(batch, x[np.asarray(perm)[i * 8 : (i + 1) * 8]])
        seen.extend(np.asarray(batch)[:, 0])
    assert len(traces) == 1
    assert len(set(seen)) == 48  # Distinct rows within one epoch.


def test_steps_per_epoch():
    assert data.steps_per_epoch(10, 3) == 3
    assert data.steps_per_epoch(10, 10) == 1
    for bad in (0, -1, 11):
        with pytest.raises(data.DataError, match="batch_size"):
            data.steps_per_epoch(10, bad)


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5)])
def test_pad_batches_matches_numpy(n, batch_size):
    x = np.arange(1, n * 2 + 1, dtype=np.float32).reshape(n, 2)
    xs, masks = data.pad_batches(x, batch_size)
    num = -(-n // batch_size)
    expected = np.zeros((num * batch_size, 2), np.float32)
    expected[:n] = x
    expected_masks = (np.arange(num * batch_size) < n).astype(np.float32)
    assert isinstance(xs, np.ndarray) and isinstance(masks, np.ndarray)
    assert xs.shape == (num, batch_size, 2) and xs.dtype == x.dtype
    assert masks.shape == (num, batch_size) and masks.dtype == np.float32
    np.testing.assert_array_equal(xs, expected.reshape(num, batch_size, 2))
    np.testing.assert_array_equal(masks, expected_masks.reshape(num, batch_size))
    rows, row_masks = xs.reshape(-1, 2), masks.reshape(-1)
    np.testing.assert_array_equal(rows[row_masks == 1], x)  # Every example once, in order.
    assert np.all(rows[row_masks == 0] == 0)  # Padding is zeros.
    # A masked mean over the batches equals the plain mean.
    total = float((xs.sum(-1) * masks).sum())
    assert total / masks.sum() == pytest.approx(float(x.sum(1).mean()))
    for bad in (0, -1):
        with pytest.raises(data.DataError, match="batch_size"):
            data.pad_batches(x, bad)


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
@pytest.mark.parametrize("n, multiple", [(10, 4), (8, 4), (3, 5), (0, 3)])
def test_pad_rows_matches_numpy(array, n, multiple):
    x = np.arange(1, n * 6 + 1, dtype=np.float32).reshape(n, 2, 3)
    padded, mask = data.pad_rows(array(x), multiple)
    m = -(-n // multiple) * multiple
    expected = np.concatenate([x, np.zeros((m - n, 2, 3), np.float32)])
    # Numpy stays numpy (host memory); a JAX array stays a JAX array.
    kind = np.ndarray if array is np.asarray else jax.Array
    assert isinstance(padded, kind) and isinstance(mask, kind)
    assert padded.shape == (m, 2, 3) and padded.dtype == np.float32
    assert mask.shape == (m,) and mask.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(padded), expected)
    np.testing.assert_array_equal(np.asarray(mask), (np.arange(m) < n).astype(np.float32))
    for bad in (0, -2):
        with pytest.raises(data.DataError, match="multiple"):
            data.pad_rows(array(x), bad)


def test_pad_rows_under_jit():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    padded, mask = jax.jit(data.pad_rows, static_argnums=1)(jnp.asarray(x), 4)
    want_x, want_mask = data.pad_rows(x, 4)
    np.testing.assert_array_equal(padded, want_x)
    np.testing.assert_array_equal(mask, want_mask)


def test_fits_on_device():
    assert data.fits_on_device(1 << 20)
    assert not data.fits_on_device(1 << 50)
    if jax.default_backend() == "cpu":
        assert not data.fits_on_device(5 * 2**30)
    with pytest.raises(data.DataError):
        data.fits_on_device(10, fraction=0.0)

"""Tests of aejax.data.offline: staging the Debian files, offline failures, the probe."""

import gzip
import hashlib
import pathlib
import shutil
import socket
import time

import numpy as np
import pytest
from conftest import FASHION_DIR, IDX_FILES, needs_debian

from aejax.data import arrays_cache, offline
from aejax.data import splits as data_splits

DEBIAN_DIR = pathlib.Path(FASHION_DIR)


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


# --------------------------------------------------------------------------------------------------
# Staging the Debian package's files, verified against tfds' checksums
# --------------------------------------------------------------------------------------------------


@needs_debian
def test_staged_gzip_files_match_tfds_checksums(tmp_path):
    cache = tmp_path / "cache"
    import tensorflow_datasets as tfds

    offline._stage_manual_files("fashion_mnist", DEBIAN_DIR, cache, tfds)
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
    offline._stage_manual_files("fashion_mnist", cache, again, tfds)
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
        offline.DataError,
        match=r"(?s)Checksum mismatch.*t10k-labels-idx1-ubyte\.gz.*expected sha256",
    ):
        offline.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    assert not (tmp_path / "tfds" / "fashion_mnist").exists()  # Nothing was prepared.


def test_manual_dir_missing_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(offline.DataError, match="t10k-images-idx3-ubyte.gz"):
        offline.prepare("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Offline failures and the network probe
# --------------------------------------------------------------------------------------------------


def test_mnist_without_network_or_files_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_network_available", lambda *args, **kwargs: False)
    start = time.monotonic()
    with pytest.raises(offline.DataError) as err:
        data_splits.load("mnist", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "manual_dir" in msg and "internet" in msg and "storage.googleapis.com" in msg


def test_fashion_mnist_without_debian_package_names_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_network_available", lambda *args, **kwargs: False)
    monkeypatch.setattr(offline, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(offline.DataError, match="apt-get install dataset-fashion-mnist"):
        offline.prepare("fashion_mnist", data_dir=str(tmp_path / "tfds"))


def test_network_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert offline._network_available("127.0.0.1", port, timeout=2.0, tls=False)
        # Accepts connections but never answers the TLS handshake (like a transparent proxy that
        # goes nowhere): unreachable, and the probe returns within its timeout.
        start = time.monotonic()
        assert not offline._network_available("127.0.0.1", port, timeout=0.5, tls=True)
        assert time.monotonic() - start < 1.5
    with socket.socket() as s:  # A port nobody listens on once closed.
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert not offline._network_available("127.0.0.1", closed_port, timeout=2.0, tls=False)
    assert not offline._network_available("no-such-host.invalid", 443, timeout=2.0)


def test_unknown_name():
    with pytest.raises(offline.DataError, match=r"mnist.*fashion_mnist"):
        offline.prepare("cifar10")


def test_errors_name_aejax_data_dir_when_it_chose_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_network_available", lambda *args, **kwargs: False)
    monkeypatch.setenv("AEJAX_DATA_DIR", str(tmp_path / "from-env"))
    with pytest.raises(offline.DataError, match=r"from-env \(from \$AEJAX_DATA_DIR\)"):
        offline.prepare("mnist")


def prepared_copy(fashion_data_dir, tmp_path) -> pathlib.Path:
    """A private copy of the prepared Fashion-MNIST tfds directory."""
    copy = tmp_path / "tfds"
    shutil.copytree(pathlib.Path(fashion_data_dir) / "fashion_mnist", copy / "fashion_mnist")
    return copy


def test_a_truncated_prepared_file_is_one_line_with_the_fix(fashion_data_dir, tmp_path):
    data_dir = prepared_copy(fashion_data_dir, tmp_path)
    (record,) = data_dir.glob("fashion_mnist/*/fashion_mnist-test.tfrecord*")
    with open(record, "r+b") as f:
        f.truncate(record.stat().st_size // 2)
    with pytest.raises(offline.DataError) as err:
        data_splits.load_arrays("fashion_mnist", "test", data_dir=str(data_dir))
    msg = str(err.value)
    assert "\n" not in msg and "cannot be read" in msg
    assert f"Delete {data_dir / 'fashion_mnist'}" in msg


# --------------------------------------------------------------------------------------------------
# The decoded arrays kept beside the data (aejax.data.arrays_cache)
# --------------------------------------------------------------------------------------------------


def no_tfds(monkeypatch):
    """Makes any read through tfds fail the test: what follows must come from the kept arrays."""
    def fail(*args, **kwargs):
        raise AssertionError("read through tfds")
    monkeypatch.setattr(data_splits, "_import_tfds", fail)
    monkeypatch.setattr(data_splits, "prepare", fail)


def test_kept_arrays_equal_the_tfds_read_and_need_no_tensorflow(fashion_data_dir, tmp_path,
                                                               monkeypatch):
    data_dir = str(prepared_copy(fashion_data_dir, tmp_path))
    x, y = data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    assert arrays_cache.read(data_dir, "fashion_mnist", "test") is not None
    with monkeypatch.context() as m:
        no_tfds(m)
        kept_x, kept_y = data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    assert kept_x.dtype == x.dtype == np.uint8 and kept_y.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(kept_x, x)
    np.testing.assert_array_equal(kept_y, y)
    assert x.shape == (10_000, 28, 28, 1)


def test_a_changed_prepared_file_is_read_through_tfds_again(fashion_data_dir, tmp_path):
    data_dir = prepared_copy(fashion_data_dir, tmp_path)
    data_splits.load_arrays("fashion_mnist", "test", data_dir=str(data_dir))
    (record,) = data_dir.glob("fashion_mnist/*/fashion_mnist-test.tfrecord*")
    with open(record, "r+b") as f:  # the same size, one byte changed: only the sha256 tells
        f.seek(record.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert arrays_cache.read(str(data_dir), "fashion_mnist", "test") is None
    shutil.rmtree(data_dir / "fashion_mnist")  # deleted: the kept arrays are not served either
    assert arrays_cache.read(str(data_dir), "fashion_mnist", "test") is None


def test_damaged_kept_arrays_are_ignored_and_written_anew(fashion_data_dir, tmp_path, monkeypatch):
    data_dir = str(prepared_copy(fashion_data_dir, tmp_path))
    x, y = data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    arrays_path, meta_path = (pathlib.Path(p) for p in arrays_cache._paths(data_dir, "fashion_mnist",
                                                                            "test"))
    blob = bytearray(arrays_path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    arrays_path.write_bytes(bytes(blob))
    assert arrays_cache.read(data_dir, "fashion_mnist", "test") is None
    again_x, _ = data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    np.testing.assert_array_equal(again_x, x)
    meta_path.write_text("{not json")  # a half-written or foreign file is ignored as well
    assert arrays_cache.read(data_dir, "fashion_mnist", "test") is None
    data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)
    with monkeypatch.context() as m:
        no_tfds(m)
        np.testing.assert_array_equal(
            data_splits.load_arrays("fashion_mnist", "test", data_dir=data_dir)[0], x)


def test_a_data_dir_where_the_arrays_cannot_be_kept_still_loads(fashion_data_dir, tmp_path):
    data_dir = prepared_copy(fashion_data_dir, tmp_path)
    (data_dir / arrays_cache.CACHE_DIR).write_text("a file where the directory would go")
    x, y = data_splits.load_arrays("fashion_mnist", "test", data_dir=str(data_dir))
    assert x.shape == (10_000, 28, 28, 1) and y.shape == (10_000,)
    assert arrays_cache.read(str(data_dir), "fashion_mnist", "test") is None


def test_manual_dir_given_for_a_prepared_dataset_is_reported(fashion_data_dir, tmp_path, caplog):
    data_dir = prepared_copy(fashion_data_dir, tmp_path)
    with caplog.at_level("WARNING", logger="aejax.data.offline"):
        assert offline.prepare("fashion_mnist", data_dir=str(data_dir),
                               manual_dir=str(tmp_path)) == str(data_dir)
    assert "is not read" in caplog.text and "already prepared" in caplog.text


def test_preparing_a_dataset_waits_for_another_process_preparing_it(tmp_path):
    """Two preparers of one dataset in one data_dir take turns (flock on separate opens)."""
    import threading

    entered = threading.Event()

    def second():
        with offline._preparing(str(tmp_path), "fashion_mnist"):
            entered.set()

    with offline._preparing(str(tmp_path), "fashion_mnist"):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)  # held: the second preparer waits
        with offline._preparing(str(tmp_path), "mnist"):  # another dataset is not held up
            pass
    assert entered.wait(10)
    t.join(10)
    assert (tmp_path / ".aejax-prepare-fashion_mnist.lock").exists()

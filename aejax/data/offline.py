"""Offline preparation of MNIST and Fashion-MNIST for tensorflow-datasets (tfds), local files first.

Rebuilds Debian's gzip headers, verifies checksums against the installed tfds, fails fast offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import socket
import ssl
import struct
import tempfile
import threading
import urllib.parse

DATASETS = ("mnist", "fashion_mnist")

# Where the Debian package `dataset-fashion-mnist` installs the four IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Debian's packaging rewrote the gzip header of the upstream Fashion-MNIST files (dropped FNAME,
# replaced MTIME); the deflate stream and CRC are untouched. These are the upstream MTIMEs, needed
# to rebuild the upstream bytes that tfds checksums. The checksums themselves are read from the
# installed tfds so that a changed upstream is caught, not hidden.
_UPSTREAM_GZIP_MTIME = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": 1504176606,
        "train-labels-idx1-ubyte.gz": 1504176606,
        "t10k-images-idx3-ubyte.gz": 1504176627,
        "t10k-labels-idx1-ubyte.gz": 1504176627,
    },
}

_NETWORK_TIMEOUT_S = 3.0

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input to aejax.data, or data that cannot be found or verified."""


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


def _default_data_dir() -> str:
    return os.environ.get("AEJAX_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def describe_data_dir(data_dir: str | None) -> str:
    """``data_dir`` as an error message should name it: where it came from when not given."""
    if data_dir:
        return os.path.expanduser(data_dir)
    if os.environ.get("AEJAX_DATA_DIR"):
        return f"{os.path.expanduser(os.environ['AEJAX_DATA_DIR'])} (from $AEJAX_DATA_DIR)"
    return f"{os.path.expanduser(_default_data_dir())} (the default; set $AEJAX_DATA_DIR to move it)"


def _import_tfds():
    """Imports tensorflow and tensorflow_datasets, keeping TF off the GPUs.

    Imported here rather than at module level because importing TF takes seconds and most users of
    aejax.data (the device-resident helpers) never need it.
    """
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"Loading datasets needs tensorflow and tensorflow-datasets ({e}). "
            "Install them with `pip install tensorflow-cpu tensorflow-datasets`."
        ) from e
    try:
        # TF only feeds numpy here; left alone it would reserve all GPU memory that JAX needs.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF's devices were already initialised (by the caller); nothing left to change.
    return tf, tfds


def _tfds_is_mocked(tfds) -> bool:
    """True inside `tfds.testing.mock_data`, where preparing is a no-op and reads are synthetic.

    Then no files and no network are needed, so tests of code built on aejax.data can run offline.
    """
    fn = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(fn, "__module__", "") == "tensorflow_datasets.testing.mocking"


def _network_available(
    host: str, port: int, timeout: float = _NETWORK_TIMEOUT_S, *, tls: bool | None = None
) -> bool:
    """Whether `host:port` answers within `timeout` seconds (a TLS handshake too, for port 443).

    Probed before tfds downloads anything because tfds, offline, retries DNS for minutes. The probe
    runs in a daemon thread because `create_connection`'s timeout does not bound the DNS lookup.
    A bare TCP connect is not proof enough: sandboxes with a transparent proxy accept connections to
    any address, so where the server speaks TLS the handshake (certificate checked) must complete.

    Args:
      host: host name or address.
      port: TCP port.
      timeout: seconds to wait in all.
      tls: whether to complete a TLS handshake; default: only for port 443.
    """
    tls = port == 443 if tls is None else tls
    result = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                        pass
                result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _url_infos(tfds, name: str) -> dict[str, tuple[str, int, str]]:
    """File name -> (url, size in bytes, sha256), from the installed tfds' own checksums file."""
    infos = tfds.builder_cls(name).url_infos
    if not infos:
        raise DataError(
            f"The installed tensorflow-datasets has no checksums for {name!r}; "
            "reinstall tensorflow-datasets."
        )
    return {
        info.filename or os.path.basename(urllib.parse.urlparse(url).path): (
            url,
            int(info.size),
            info.checksum,
        )
        for url, info in infos.items()
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gzip_payload_offset(data: bytes, filename: str) -> int:
    """Offset of the deflate stream in a gzip file: after the optional header fields (RFC 1952)."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
        raise DataError(f"{filename} is not a gzip file; expected the gzip-compressed IDX file.")
    flags = data[3]
    pos = 10
    if flags & 0x04:  # FEXTRA
        (extra_len,) = struct.unpack("<H", data[pos : pos + 2])
        pos += 2 + extra_len
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: NUL-terminated
        if flags & flag:
            pos = data.index(b"\x00", pos) + 1
    if flags & 0x02:  # FHCRC
        pos += 2
    return pos


def _upstream_gzip_bytes(data: bytes, filename: str, mtime: int) -> bytes:
    """Rebuilds an upstream gzip file from a copy whose header was rewritten (as Debian's).

    The upstream header sets FNAME (the name without `.gz`) and the given MTIME; XFL, OS, the
    deflate stream and the CRC are kept from `data`.

    Args:
      data: bytes of the gzip file as found locally.
      filename: upstream file name, e.g. `"train-images-idx3-ubyte.gz"`.
      mtime: upstream gzip MTIME, seconds since the epoch.

    Returns:
      The rebuilt gzip bytes.
    """
    offset = _gzip_payload_offset(data, filename)
    stem = filename[: -len(".gz")] if filename.endswith(".gz") else filename
    header = data[:3] + b"\x08" + struct.pack("<I", mtime) + data[8:10] + stem.encode() + b"\x00"
    return header + data[offset:]


def _write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file of its own and a rename: a crash
    mid-write leaves no truncated file that a later run would pick up, and processes writing the
    same path at once never mix their bytes."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # as any file the data directory holds (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _stage_manual_files(name: str, source_dir: pathlib.Path, cache_dir: pathlib.Path, tfds) -> None:
    """Puts verified upstream copies of `name`'s files from `source_dir` into `cache_dir`.

    Each file is used as is when it already matches tfds' checksum, else its gzip header is rebuilt
    (when the upstream header is known); either way its sha256 and size are checked.

    Raises:
      DataError: a file is missing or matches neither as is nor rebuilt.
    """
    expected = _url_infos(tfds, name)
    missing = sorted(f for f in expected if not (source_dir / f).is_file())
    if missing:
        raise DataError(
            f"{source_dir} lacks {missing} for {name!r}; it needs the four IDX files "
            f"{sorted(expected)} as downloaded from upstream."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    for filename, (url, size, sha) in sorted(expected.items()):
        target = cache_dir / filename
        if (
            target.is_file()
            and target.stat().st_size == size
            and _sha256(target.read_bytes()) == sha
        ):
            continue  # Staged by an earlier run.
        data = (source_dir / filename).read_bytes()
        actual = _sha256(data)
        if actual != sha and filename in _UPSTREAM_GZIP_MTIME.get(name, {}):
            data = _upstream_gzip_bytes(data, filename, _UPSTREAM_GZIP_MTIME[name][filename])
            actual = _sha256(data)
        if actual != sha or len(data) != size:
            raise DataError(
                f"Checksum mismatch for {source_dir / filename} ({name!r}): expected sha256 {sha} "
                f"and {size} bytes (tfds' checksums for {url}), got sha256 {actual} and "
                f"{len(data)} bytes. The file is damaged or not the upstream file: "
                + (
                    "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`, or "
                    if name == "fashion_mnist"
                    else ""
                )
                + f"download it again from {url}."
            )
        _write_atomic(target, data)


def _has_all_files(directory: pathlib.Path, filenames) -> bool:
    return all((directory / f).is_file() for f in filenames)


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Makes sure tfds has `name` prepared in `data_dir`, offline where local files exist.

    Sources, in order: `manual_dir` if given; for Fashion-MNIST the Debian package
    `dataset-fashion-mnist` (its gzip headers are rebuilt to the upstream bytes); else a download,
    only if the network answers within seconds. Local files are verified against the sha256 and
    sizes in the installed tensorflow-datasets' checksums, then staged in
    `<data_dir>/downloads/manual/<name>` for tfds.

    Args:
      name: one of `DATASETS`.
      data_dir: tfds data directory; default `$AEJAX_DATA_DIR` or `~/tensorflow_datasets`.
      manual_dir: directory holding the four upstream IDX `.gz` files.

    Returns:
      The data directory (user-expanded) where `name` is prepared.

    Raises:
      DataError: unknown name, missing or damaged files, or no files and no network.

    >>> data_dir = prepare("fashion_mnist")  # doctest: +SKIP
    """
    _check_name(name)
    shown = describe_data_dir(data_dir)
    data_dir = os.path.expanduser(data_dir or _default_data_dir())
    _, tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except OSError as e:
        raise DataError(f"Cannot use the tfds data directory {shown}: {e.strerror or e}. Pass "
                        "another data_dir or set $AEJAX_DATA_DIR to a directory you can write.") from None
    if _tfds_is_mocked(tfds):
        return data_dir
    if prepared:
        if manual_dir is not None:
            log.warning("manual_dir %s is not read: %r is already prepared in %s. To prepare it "
                        "again from manual_dir, delete %s first.", manual_dir, name, shown,
                        os.path.join(data_dir, name))
        return data_dir

    with _preparing(data_dir, name):
        # Another process may have prepared it while this one waited for the lock.
        if tfds.builder(name, data_dir=data_dir).is_prepared():
            return data_dir
        _prepare_unlocked(tfds, builder, name, data_dir, manual_dir, shown)
    return data_dir


@contextlib.contextmanager
def _preparing(data_dir: str, name: str):
    """Holds an exclusive lock on ``<data_dir>/.aejax-prepare-<name>.lock`` while preparing.

    Processes that start at once (several hosts on one filesystem, parallel test workers) then
    prepare a dataset one after another: the first prepares it and the others find it prepared.
    The kernel releases the lock when its holder dies. Without ``fcntl`` (not POSIX) nothing is
    locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".aejax-prepare-{name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_unlocked(tfds, builder, name: str, data_dir: str, manual_dir: str | None,
                      shown: str) -> None:
    filenames = _url_infos(tfds, name)
    source = None
    if manual_dir is not None:
        source = pathlib.Path(manual_dir).expanduser()
        if not source.is_dir():
            raise DataError(f"manual_dir {source} is not a directory.")
    elif name == "fashion_mnist" and _has_all_files(
        pathlib.Path(DEBIAN_FASHION_MNIST_DIR), filenames
    ):
        source = pathlib.Path(DEBIAN_FASHION_MNIST_DIR)

    download_config = None
    if source is not None:
        cache_dir = pathlib.Path(data_dir) / "downloads" / "manual" / name
        _stage_manual_files(name, source, cache_dir, tfds)
        download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(cache_dir))
    else:
        url = urllib.parse.urlparse(next(iter(filenames.values()))[0])
        port = url.port or (443 if url.scheme == "https" else 80)
        if not _network_available(url.hostname, port):
            fixes = [
                f"pass manual_dir=... with the four upstream IDX files {sorted(filenames)}",
                f"or connect to the internet (tfds downloads from {url.hostname})",
            ]
            if name == "fashion_mnist":
                fixes.insert(
                    0, "install the Debian package: `apt-get install dataset-fashion-mnist`"
                )
            raise DataError(
                f"Cannot prepare {name!r} in {shown}: no local files and {url.hostname}:{port} "
                f"is unreachable. To fix: {'; '.join(fixes)}."
            )
    builder.download_and_prepare(download_config=download_config)

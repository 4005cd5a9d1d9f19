"""Datasets for aejax: MNIST and Fashion-MNIST as numpy arrays, offline where possible.

Holds the tensorflow-datasets (tfds) preparation and reading, the train/validation/test split, and
the small pure-JAX helpers that batch and shuffle a dataset that sits on the accelerator.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("mnist", "fashion_mnist")

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)

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
# Batch size used to read a whole split. Not `batch_size=-1`: under tfds.testing.mock_data that
# aborts the process (std::length_error); a finite batch works on real and mock data alike.
_READ_BATCH = 10_000


class DataError(ValueError):
    """Bad input to aejax.data, or data that cannot be found or verified."""


class Splits(NamedTuple):
    """Train, validation and test sets, each `(x float32 in [0, 1], y int32)`."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Preparation (tfds, offline first)
# --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


def _default_data_dir() -> str:
    return os.environ.get("AEJAX_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


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


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated file that a later run would pick up.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    data_dir = os.path.expanduser(data_dir or _default_data_dir())
    _, tfds = _import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared() or _tfds_is_mocked(tfds):
        return data_dir

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
                f"Cannot prepare {name!r} in {data_dir}: no local files and {url.hostname}:{port} "
                f"is unreachable. To fix: {'; '.join(fixes)}."
            )
    builder.download_and_prepare(download_config=download_config)
    return data_dir


# --------------------------------------------------------------------------------------------------
# Reading whole splits
# --------------------------------------------------------------------------------------------------


def load_arrays(
    name: str, split: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split as numpy, preparing the dataset first if needed.

    Args:
      name: one of `DATASETS`.
      split: `"train"` or `"test"`.
      data_dir: tfds data directory (see `prepare`).
      manual_dir: directory with the upstream IDX files (see `prepare`).

    Returns:
      `(images, labels)`: uint8 of shape (N, 28, 28, 1) and int32 of shape (N,).

    Raises:
      DataError: bad name or split, or the data cannot be prepared.
    """
    _check_name(name)
    if split not in ("train", "test"):
        raise DataError(f"Unknown split {split!r}; expected 'train' or 'test'.")
    data_dir = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    _, tfds = _import_tfds()
    ds = tfds.builder(name, data_dir=data_dir).as_dataset(
        split=split, as_supervised=True, shuffle_files=False, batch_size=_READ_BATCH
    )
    images, labels = [], []
    for x, y in tfds.as_numpy(ds):
        images.append(x)
        labels.append(y)
    if not images:
        return np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros((0,), np.int32)
    # tfds gives int64 labels; int32 is what JAX uses by default.
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
    classes = tuple(classes)
    bad = [
        c
        for c in classes
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < NUM_CLASSES
    ]
    if not classes or bad:
        raise DataError(
            f"classes must be a non-empty sequence of labels in 0..{NUM_CLASSES - 1}; "
            f"got {classes!r}."
        )
    return classes


def _validation_count(validation_size: int | float, num_train: int) -> int:
    if isinstance(validation_size, bool) or not isinstance(
        validation_size, (int, float, np.integer, np.floating)
    ):
        raise DataError(f"validation_size must be an int or a float; got {validation_size!r}.")
    if isinstance(validation_size, (float, np.floating)):
        if not 0.0 < validation_size < 1.0:
            raise DataError(
                f"A fractional validation_size must lie in (0, 1); got {validation_size}. "
                "Pass an int for a count of examples."
            )
        count = int(round(validation_size * num_train))
    else:
        count = int(validation_size)
    if not 0 <= count < num_train:
        raise DataError(
            f"validation_size {validation_size!r} gives {count} validation examples, but it must "
            f"leave at least one of the {num_train} training examples (0 <= count < {num_train})."
        )
    return count


def _to_float(x: np.ndarray, flat: bool) -> np.ndarray:
    x = x.astype(np.float32) / np.float32(255.0)
    return x.reshape(len(x), -1) if flat else x


def load(
    name: str,
    *,
    validation_size: int | float = 5000,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    flat: bool = False,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> Splits:
    """Loads train, validation and test sets, scaled to float32 in [0, 1].

    The validation set is held out of tfds' train split by a permutation seeded by `seed`, so the
    same seed gives the same split; the test set is tfds' test split. Both splits keep the original
    example order.

    Args:
      name: one of `DATASETS`.
      validation_size: number of validation examples, or a fraction in (0, 1) of the train split
        (after `classes` filtering).
      seed: seed of the validation hold-out.
      classes: keep only these labels (labels keep their original values); None keeps all.
      flat: images as (N, 784) if True, else NHWC (N, 28, 28, 1).
      data_dir: tfds data directory (see `prepare`).
      manual_dir: directory with the upstream IDX files (see `prepare`).

    Returns:
      `Splits(train=(x, y), validation=(x, y), test=(x, y))`, x float32 and y int32.

    Raises:
      DataError: bad arguments, or a filter that leaves no training examples.

    >>> splits = load("fashion_mnist", validation_size=0.1, classes=(1, 5, 6))  # doctest: +SKIP
    >>> x_train, y_train = splits.train
    """
    _check_name(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an int; got {seed!r}.")
    if classes is not None:
        classes = _check_classes(classes)
    x_train, y_train = load_arrays(name, "train", data_dir=data_dir, manual_dir=manual_dir)
    x_test, y_test = load_arrays(name, "test", data_dir=data_dir, manual_dir=manual_dir)
    if classes is not None:
        keep_train, keep_test = np.isin(y_train, classes), np.isin(y_test, classes)
        x_train, y_train = x_train[keep_train], y_train[keep_train]
        x_test, y_test = x_test[keep_test], y_test[keep_test]
    if len(y_train) == 0:
        raise DataError(f"No training examples of {name!r} left with classes={classes}.")
    count = _validation_count(validation_size, len(y_train))
    perm = np.random.default_rng(int(seed)).permutation(len(y_train))
    val_idx, train_idx = np.sort(perm[:count]), np.sort(perm[count:])
    return Splits(
        train=(_to_float(x_train[train_idx], flat), y_train[train_idx]),
        validation=(_to_float(x_train[val_idx], flat), y_train[val_idx]),
        test=(_to_float(x_test, flat), y_test),
    )


# --------------------------------------------------------------------------------------------------
# Checks and transforms on arrays
# --------------------------------------------------------------------------------------------------


def check_images(x, *, name: str = "x") -> None:
    """Raises DataError unless `x` holds finite floating images in [0, 1].

    Args:
      x: numpy or JAX array.
      name: how the error message calls `x`.

    Raises:
      DataError: integer dtype, NaN or inf, or values outside [0, 1].
    """
    x = np.asarray(x)
    # jnp.issubdtype, unlike np's, counts bfloat16 as floating.
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DataError(
            f"{name} has dtype {x.dtype}; expected floating images in [0, 1]. "
            f"Convert with {name}.astype(np.float32) / 255."
        )
    if x.size == 0:
        return
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} contains {np.count_nonzero(~np.isfinite(x))} NaN or inf values.")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = " Did you forget to divide by 255?" if hi > 1.0 else ""
        raise DataError(f"{name} has values in [{lo}, {hi}]; expected [0, 1].{hint}")


def binarize(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Dynamic binarization: a Bernoulli(x) sample, as x's dtype.

    Args:
      rng: PRNG key; fold in the step so each step draws fresh samples.
      x: intensities in [0, 1], any shape.

    Returns:
      Array like `x` with values in {0, 1}.

    >>> binarize(jax.random.key(0), jnp.array([0.0, 1.0]))
    Array([0., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    return jax.random.bernoulli(rng, x).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Device-resident fast path: the whole dataset on the accelerator, shuffled and batched there.
# --------------------------------------------------------------------------------------------------


def epoch_permutation(rng: jax.Array, num_examples: int, epoch) -> jax.Array:
    """The example order of `epoch`: a permutation of range(num_examples).

    It depends only on (rng, epoch), so a run resumed from a checkpoint sees the same order.

    Args:
      rng: PRNG key of the data order.
      num_examples: dataset size (static).
      epoch: epoch index; may be traced.

    Returns:
      int32 array of shape (num_examples,).
    """
    return jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)


def take_batch(x: jax.Array, perm: jax.Array, index, batch_size: int) -> jax.Array:
    """Rows `perm[index * batch_size : (index + 1) * batch_size]` of `x`; works under jit.

    `index` may be traced; `batch_size` must be static. Iterate `index` over
    `range(steps_per_epoch(len(x), batch_size))`: past the end, `dynamic_slice` clamps its start
    and would silently repeat examples.

    Args:
      x: dataset of shape (N, ...).
      perm: permutation of range(N), e.g. from `epoch_permutation`.
      index: batch index within the epoch.
      batch_size: rows per batch.

    Returns:
      Array of shape (batch_size, ...).
    """
    rows = jax.lax.dynamic_slice(perm, (index * batch_size,), (batch_size,))
    return gather_rows(x, rows)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` without bounds checks: ``rows`` must be valid row indices (from a permutation).

    Inside a jitted step this is the whole input pipeline of the device-resident path; skipping
    the clamping that ``jnp.take`` adds keeps it to one plain gather.
    """
    return x.at[rows].get(mode="promise_in_bounds")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches in an epoch (the remainder is left to the next epoch's shuffle).

    Raises:
      DataError: batch_size <= 0 or larger than num_examples.
    """
    if batch_size <= 0 or batch_size > num_examples:
        raise DataError(
            f"batch_size must be in 1..{num_examples} (the number of examples); got {batch_size}."
        )
    return num_examples // batch_size


def pad_rows(x, multiple: int):
    """`x` with zero rows appended up to a multiple of `multiple` rows, and a mask of the real rows.

    Numpy input is padded with numpy (on the host), anything else with jax.numpy, so this also
    works under jit (`multiple` static).

    Args:
      x: numpy or JAX array of shape (N, ...).
      multiple: positive int.

    Returns:
      `(x_padded, mask)`: x_padded of shape (M, ...) with M = ceil(N / multiple) * multiple, zeros
      in rows N.., and mask float32 of shape (M,), 1 for the rows of `x` and 0 for padding; both
      numpy for numpy input, else JAX arrays.

    Raises:
      DataError: multiple <= 0.
    """
    if multiple <= 0:
        raise DataError(f"multiple must be positive; got {multiple}.")
    xp = np if isinstance(x, np.ndarray) else jnp
    n = len(x)
    pad = -n % multiple
    mask = xp.concatenate([xp.ones((n,), xp.float32), xp.zeros((pad,), xp.float32)])
    if pad:
        x = xp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x, mask


def pad_batches(x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-shape batches that cover every example exactly once, with a mask for the padding.

    The last batch is padded with zeros to `batch_size`, so a jitted eval step compiles once; the
    mask (float32, 1 for real rows, 0 for padding) lets a masked mean count each example once:
    `sum(loss * mask) / sum(mask)`.

    Args:
      x: numpy array of shape (N, ...).
      batch_size: rows per batch, > 0.

    Returns:
      `(xs, masks)` of shapes (num_batches, batch_size, ...) and (num_batches, batch_size), with
      num_batches = ceil(N / batch_size).

    Raises:
      DataError: batch_size <= 0.

    >>> xs, masks = pad_batches(np.ones((3, 2), np.float32), 2)
    >>> xs.shape, masks.tolist()
    ((2, 2, 2), [[1.0, 1.0], [1.0, 0.0]])
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive; got {batch_size}.")
    x, mask = pad_rows(x, batch_size)
    num_batches = len(x) // batch_size
    return x.reshape((num_batches, batch_size) + x.shape[1:]), mask.reshape(num_batches, batch_size)


def fits_on_device(nbytes: int, *, fraction: float = 0.5) -> bool:
    """Whether `nbytes` is below `fraction` of the default device's memory.

    Uses `memory_stats()["bytes_limit"]` where the device reports it; a CPU device reports nothing
    useful, so there 4 GiB is taken as the limit.

    Args:
      nbytes: size of the data to place on the device.
      fraction: share of device memory the data may take, in (0, 1]; the rest is for the model,
        optimizer state and activations.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1]; got {fraction}.")
    device = jax.devices()[0]
    limit = None
    try:
        stats = device.memory_stats()
    except Exception:  # Some backends raise instead of returning None.
        stats = None
    if stats and stats.get("bytes_limit"):
        limit = stats["bytes_limit"] * fraction
    if limit is None:
        return nbytes < 4 * 2**30
    return nbytes < limit


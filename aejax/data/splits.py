"""Train, validation and test sets of MNIST and Fashion-MNIST as numpy arrays, read through tfds.

Holds the dataset constants, class filtering, the seeded validation hold-out and the image check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# DATASETS (the names `load` accepts) is imported for callers too: offline owns it because
# `prepare` checks the name before it touches tfds.
from aejax.data import arrays_cache
from aejax.data.offline import (DATASETS, DataError, _check_name, _default_data_dir, _import_tfds,
                                 _tfds_is_mocked, describe_data_dir, prepare)

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# The datasets' label names, by label.
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"),
}

# Batch size used to read a whole split. Not `batch_size=-1`: under tfds.testing.mock_data that
# aborts the process (std::length_error); a finite batch works on real and mock data alike.
_READ_BATCH = 10_000


class Splits(NamedTuple):
    """Train, validation and test sets, each `(x float32 in [0, 1], y int32)`."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def load_arrays(
    name: str, split: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split as numpy, preparing the dataset first if needed.

    The first read goes through tfds; the decoded arrays are then kept beside the data, with a
    fingerprint of the prepared files, and later reads in any process take them from there while
    the prepared files are unchanged (:mod:`aejax.data.arrays_cache`).

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
    shown = describe_data_dir(data_dir)
    tfds_module = sys.modules.get("tensorflow_datasets")
    mocked = tfds_module is not None and _tfds_is_mocked(tfds_module)
    if not mocked and manual_dir is None:
        kept = arrays_cache.read(os.path.expanduser(data_dir or _default_data_dir()), name, split)
        if kept is not None:
            return kept
    data_dir = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    tf, tfds = _import_tfds()
    prepared_files = None if _tfds_is_mocked(tfds) else arrays_cache.fingerprint(data_dir, name)
    images, labels = [], []
    try:
        ds = tfds.builder(name, data_dir=data_dir).as_dataset(
            split=split, as_supervised=True, shuffle_files=False, batch_size=_READ_BATCH
        )
        for x, y in tfds.as_numpy(ds):
            images.append(x)
            labels.append(y)
    except tf.errors.OpError as e:  # e.g. DataLossError: a prepared file cut short or damaged
        first = (e.message or str(e)).strip().splitlines()[0]
        raise DataError(
            f"The prepared copy of {name!r} in {shown} cannot be read "
            f"({type(e).__name__}: {first}). Delete {os.path.join(data_dir, name)} and run "
            "again to prepare it anew."
        ) from None
    if not images:
        return np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros((0,), np.int32)
    # tfds gives int64 labels; int32 is what JAX uses by default.
    images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int32)
    if prepared_files is not None:
        arrays_cache.write(data_dir, name, split, images, labels, prepared_files)
    return images, labels


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

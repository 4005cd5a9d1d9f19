"""A verified copy of each split's decoded arrays beside the tfds data: later loads skip TensorFlow.

Reading a split through tfds imports TensorFlow and decodes every record, about 15 s for
Fashion-MNIST on a 2-core machine, in every process that loads it. After the first read,
:func:`aejax.data.splits.load_arrays` keeps the decoded ``(images, labels)`` in
``<data_dir>/.aejax-arrays/<name>-<split>.npz`` with a JSON file that holds

- the fingerprint of the prepared tfds copy the arrays were decoded from: the relative path, size
  and sha256 of every file under ``<data_dir>/<name>``;
- the sha256 of the ``.npz`` file itself.

A later load uses the copy only when both match, which costs hashing the files (a fraction of a
second). A prepared copy that was changed, damaged, deleted or re-prepared at another version is
read through tfds again (which reports a damaged file), and the arrays are written anew. A damaged
or half-written cache is ignored the same way. Writing is atomic (a temporary file, then a rename),
so processes loading at once never see each other's partial files; a data directory that cannot
be written simply goes without the copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Optional

import numpy as np

from aejax.data.offline import _write_atomic

log = logging.getLogger(__name__)

CACHE_DIR = ".aejax-arrays"
FORMAT = 1
_CHUNK = 1 << 22


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(data_dir: str, name: str) -> Optional[list]:
    """``[[relative path, size, sha256], ...]`` of the files under ``<data_dir>/<name>``, sorted;
    None when there are none (not prepared)."""
    root = os.path.join(data_dir, name)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            entries.append([os.path.relpath(path, root), os.path.getsize(path), _sha256_file(path)])
    return entries or None


def _paths(data_dir: str, name: str, split: str) -> tuple[str, str]:
    base = os.path.join(data_dir, CACHE_DIR, f"{name}-{split}")
    return base + ".npz", base + ".json"


def read(data_dir: str, name: str, split: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The kept arrays of ``name``'s ``split``, or None unless they are there, intact, and were
    decoded from the prepared files now in ``data_dir``."""
    arrays_path, meta_path = _paths(data_dir, name, split)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint(data_dir, name):
            return None
        with open(arrays_path, "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            log.info("The kept arrays of %s %s are damaged; reading the tfds copy again.",
                     name, split)
            return None
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or malformed
        return None


def write(data_dir: str, name: str, split: str, images: np.ndarray, labels: np.ndarray,
          prepared: list) -> bool:
    """Keeps ``(images, labels)`` decoded from the prepared files ``prepared`` (their
    :func:`fingerprint`, taken before the read); False where the data directory cannot be
    written."""
    arrays_path, meta_path = _paths(data_dir, name, split)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    blob = buffer.getvalue()
    meta = {"format": FORMAT, "dataset": name, "split": split,
            "sha256": hashlib.sha256(blob).hexdigest(), "fingerprint": prepared}
    try:
        os.makedirs(os.path.dirname(arrays_path), exist_ok=True)
        _write_atomic(arrays_path, blob)
        _write_atomic(meta_path, json.dumps(meta).encode())
    except OSError as e:
        log.info("Not keeping the decoded arrays of %s %s in %s (%s).", name, split, data_dir, e)
        return False
    return True

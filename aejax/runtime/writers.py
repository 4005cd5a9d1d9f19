"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard event files, and W&B when asked.

Every writer takes the same rows (a step, a split, named numbers), images and hyperparameters;
:func:`create` builds the ones a config asks for, on process 0 only.

TensorBoard files are written with ``tensorboardX``: it needs only numpy, protobuf and packaging
(and Pillow for images), works with any JAX, and its synchronous ``EventsWriter`` puts a record
on disk when told to flush, which a run needs to resume without losing or repeating a step.
TensorBoard's own writer is internal API and pulls in its server's dependencies; clu's
``metric_writers`` need TensorFlow. Weights & Biases (``wandb``) is optional.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import struct
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

EVENT_FILES = "events.out.tfevents.*"
WANDB_MODES = ("offline", "online", "disabled")


def tag(split: str, name: str) -> str:
    """The name of a row's value in TensorBoard and W&B: ``"train/loss"``."""
    return f"{split}/{name}"


def scalars_of(split: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a row as tagged scalars (booleans as 0 or 1; strings are left out)."""
    return {tag(split, k): float(v) for k, v in row.items()
            if isinstance(v, (bool, int, float, np.integer, np.floating))}


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optimizer.learning_rate": 0.001, ...}``: numbers, bools and strings
    as they are, anything else (tuples, None) as its JSON text."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def image_grid(rows: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    """Rows of images side by side as one ``(H, W)`` uint8 picture, or None when the examples
    are not images (flat vectors whose size is not a square, such as a stacked stage's codes).

    Args:
      rows: arrays ``(n, side * side)``, ``(n, H, W)`` or ``(n, H, W, 1)``, values in [0, 1].
    """
    first = np.asarray(rows[0])
    shape = first.shape[1:]
    if len(shape) == 1:
        side = int(round(np.sqrt(shape[0])))
        if side * side != shape[0] or side < 2:
            return None
        shape = (side, side)
    elif len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    elif len(shape) != 2:
        return None
    h, w = shape
    n = len(first)
    grid = np.ones(((h + 1) * len(rows) - 1, (w + 1) * n - 1), np.float32)  # white lines between
    for r, images in enumerate(rows):
        images = np.asarray(images, np.float32).reshape(len(images), h, w)
        for c in range(min(n, len(images))):
            grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[c]
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- the writers


class JsonlWriter:
    """``metrics.jsonl``: one JSON object a row, ``{"step", "split", <the row's values>}``.

    Args:
      path: the file.
      resume_step: the step of the checkpoint a run resumes from: lines logged after it are
        dropped (the run logs them again); None: a fresh start, any old file is removed.
    """

    takes_images = False

    def __init__(self, path: str, *, resume_step: Optional[int]):
        self.path = path
        if resume_step is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            truncate_jsonl(path, resume_step)
        self._file = open(path, "a")

    def write_scalars(self, step: int, split: str, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"step": int(step), "split": split, **row}) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        del step, images

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Sequence[str]) -> None:
        del hparams, metrics

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: str, step: int) -> None:
    """Drops the lines of ``path`` logged after ``step``, and damaged ones.

    A last line cut short by a kill is dropped quietly; any other line that is not a JSON
    object with a numeric step is dropped with a warning naming its line number.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = [ln for ln in f if ln.strip()]
    kept, damaged = [], []
    for number, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), (int, float)):
            damaged.append(number)
        elif row.get("step", 0) <= step:
            kept.append(ln if ln.endswith(b"\n") else ln + b"\n")
    if damaged and damaged != [len(lines)]:
        log.warning("Dropped %d unreadable line(s) of %s (line %s): not a JSON object with a "
                    "numeric step.", len(damaged), path, ", ".join(map(str, damaged[:5])))
    with open(path, "wb") as f:
        f.writelines(kept)


class TensorBoardWriter:
    """TensorBoard event files in ``logdir``: scalars ``split/name``, images, hyperparameters.

    Each process that writes adds one file (created at its first write). On a resume the files
    already there keep only the events up to the checkpoint's step, so the curves continue
    without a repeated or a missing step, whatever TensorBoard's reader does with restarts.

    Args:
      logdir: the directory (the run's workdir).
      resume_step: as for :class:`JsonlWriter`; None removes old event files.
    """

    takes_images = True

    def __init__(self, logdir: str, *, resume_step: Optional[int]):
        from tensorboardX import summary  # noqa: F401 - fails here, not at the first write

        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(logdir, EVENT_FILES))):
            if resume_step is None:
                os.remove(path)
            else:
                trim_event_file(path, resume_step)
        self._events = None

    def _write(self, step: int, summary) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event

        if self._events is None:
            # The name orders this process's file after those of earlier ones, also within a
            # second; TensorBoard reads the files of a directory in the order of their names.
            self._events = EventsWriter(os.path.join(self.logdir, "events"),
                                        f".{time.time_ns()}.{os.getpid()}")
        self._events.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, split: str, row: Mapping[str, Any]) -> None:
        from tensorboardX import summary

        for name, value in scalars_of(split, row).items():
            self._write(step, summary.scalar(name, value))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from tensorboardX import summary

        for name, picture in images.items():
            self._write(step, summary.image(name, picture, dataformats="HW"))

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Sequence[str]) -> None:
        """The config for TensorBoard's HPARAMS tab, with the tags of the ``metrics`` it shows.

        The session-end record is left out: it marks a run as finished.
        """
        from tensorboardX import summary

        experiment, session_start, _ = summary.hparams(dict(hparams), {m: 0.0 for m in metrics})
        self._write(0, experiment)
        self._write(0, session_start)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()  # to the disk (fsync): a SIGKILL after it loses nothing

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _records(data: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each whole, intact TFRecord in ``data``; stops at the first that is
    cut short or fails its checksums (the tail a kill can leave)."""
    from tensorboardX.record_writer import masked_crc32c

    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if (end > len(data) or struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header)
                or struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(data[pos + 12:end - 4])):
            return
        yield pos, end
        pos = end


def trim_event_file(path: str, step: int) -> None:
    """Keeps the events of ``path`` up to ``step`` (and none after a damaged record); the file
    is replaced at once (``os.replace``), so a kill leaves either the old or the new one."""
    from tensorboardX.proto.event_pb2 import Event

    with open(path, "rb") as f:
        data = f.read()
    kept, whole = [], True
    records = list(_records(data))
    if not records or records[-1][1] != len(data):
        whole = False
    for start, end in records:
        if Event.FromString(data[start + 12:end - 4]).step <= step:
            kept.append(data[start:end])
        else:
            whole = False
    if whole:
        return
    if not kept:
        os.remove(path)
        return
    tmp = f"{path}.trim-{os.getpid()}"  # not an event file's name: never read as one
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WandbWriter:
    """A Weights & Biases run (``wandb``, optional): the same tags as TensorBoard.

    A resumed run continues the W&B run of the same id (``resume="allow"``); W&B's files go under
    ``WORKDIR/wandb``. With ``mode="offline"`` nothing leaves the machine (``wandb sync`` uploads
    later). W&B refuses a step below one it has seen, so steps a resumed run logs again are
    left out where W&B knows them (online); offline, each process's files hold its own steps.

    Args:
      workdir: the run's workdir.
      run_id: the W&B run id, kept across resumes.
      config: the run's config (nested dict), shown as the W&B run's config.
      project, entity, name, mode: as ``wandb.init`` takes them ("" for W&B's default).
    """

    takes_images = True

    def __init__(self, workdir: str, *, run_id: str, config: Mapping[str, Any], project: str,
                 entity: str = "", name: str = "", mode: str = "offline"):
        import wandb  # noqa: F401 - fails here, not at the first write

        self._init = dict(dir=workdir, id=run_id, resume="allow", config=dict(config),
                          project=project, entity=entity or None, name=name or None, mode=mode)
        self._run = None

    def _started(self):
        if self._run is None:  # at the first write: a finished run's re-evaluation starts none
            import wandb

            self._run = wandb.init(**self._init)
            self._first_step = int(self._run.step or 0)
        return self._run

    def write_scalars(self, step: int, split: str, row: Mapping[str, Any]) -> None:
        run = self._started()
        if step >= self._first_step:
            run.log(scalars_of(split, row), step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        import wandb

        run = self._started()
        if step >= self._first_step:
            run.log({name: wandb.Image(picture) for name, picture in images.items()}, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Sequence[str]) -> None:
        del hparams, metrics  # given to wandb.init as the run's config

    def flush(self) -> None:
        pass  # W&B's own process writes and uploads

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MultiWriter:
    """Several writers as one; none at all on processes other than 0."""

    def __init__(self, writers: Sequence[Any] = ()):
        self.writers = list(writers)

    @property
    def takes_images(self) -> bool:
        """Whether any writer keeps images (worth drawing them)."""
        return any(w.takes_images for w in self.writers)

    def write_scalars(self, step: int, split: str, row: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, split, row)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def write_hparams(self, hparams: Mapping[str, Any], metrics: Sequence[str]) -> None:
        for w in self.writers:
            w.write_hparams(hparams, metrics)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def __enter__(self) -> "MultiWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def missing_package(config) -> Optional[str]:
    """The package a config's writers need that is not installed, or None."""
    if config.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        return "tensorboardX"
    if config.wandb.enabled and importlib.util.find_spec("wandb") is None:
        return "wandb"
    return None


def create(config, workdir: str, *, resume_step: Optional[int], run_id: str,
           primary: bool = True) -> MultiWriter:
    """The writers ``config`` asks for in ``workdir``: always ``metrics.jsonl``, TensorBoard
    when ``config.tensorboard``, W&B when ``config.wandb.enabled``; none unless ``primary``.

    Args:
      config: the run's config (:func:`aejax.runtime.config.default_config`).
      workdir: the run's directory.
      resume_step: the step of the checkpoint the run resumes from, None for a fresh start.
      run_id: the run's W&B id (kept in the checkpoints' progress).
      primary: whether this is process 0.
    """
    if not primary:
        return MultiWriter()
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=resume_step)]
    if config.tensorboard:
        writers.append(TensorBoardWriter(workdir, resume_step=resume_step))
    if config.wandb.enabled:
        w = config.wandb
        writers.append(WandbWriter(workdir, run_id=run_id, config=config.to_dict(),
                                   project=w.project, entity=w.entity, name=w.name, mode=w.mode))
    return MultiWriter(writers)

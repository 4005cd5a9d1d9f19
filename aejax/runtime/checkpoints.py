"""Orbax checkpoints of a run: the train state (params, optimizer state, step) and JSON metadata.

Restoring walks back from the newest step: a checkpoint that fails to restore is moved aside
(kept for inspection, never deleted) with a warning, and the one before it is used. A readable
checkpoint whose leaves or shapes differ from what the run builds (another model or optimizer)
is not corrupt: that is a :class:`CheckpointMismatchError`, and nothing is moved. In a
multi-process run every process calls every method (orbax coordinates the writes).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds another train state than the one asked for (another model or
    optimizer): not corruption, so nothing is moved aside."""


def _path_key(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_shapes(tree: Any) -> dict:
    """``{path: shape}`` of a pytree's leaves (arrays, shape structs or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_key(p): tuple(getattr(v, "shape", None) or ()) for p, v in leaves}


def _differences(on_disk: dict, wanted: dict, limit: int = 6) -> str:
    show = lambda paths: ", ".join("/".join(p) for p in sorted(paths)[:limit]) + (
        f" and {len(paths) - limit} more" if len(paths) > limit else "")
    parts = []
    if missing := set(wanted) - set(on_disk):
        parts.append(f"not in the checkpoint: {show(missing)}")
    if extra := set(on_disk) - set(wanted):
        parts.append(f"only in the checkpoint: {show(extra)}")
    if shapes := [p for p in set(wanted) & set(on_disk) if on_disk[p] != wanted[p]]:
        parts.append("other shapes: " + ", ".join(
            f"{'/'.join(p)} {on_disk[p]} on disk, {wanted[p]} now" for p in sorted(shapes)[:limit]))
    return "; ".join(parts)


class Checkpoints:
    """Periodic checkpoints of a pytree ``state`` plus a JSON-able ``meta`` dict.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: newest checkpoints kept.
      async_save: write in a background thread (the train loop goes on meanwhile).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # Handlers given up front (not learnt from the first save or restore): read() needs the
        # metadata of a checkpoint before restoring anything from it.
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        """Saves ``state`` and ``meta`` as ``step`` (waits for an earlier async save first)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def read(self, step: Optional[int] = None) -> tuple[Any, dict]:
        """``(state, meta)`` saved at ``step`` (default: newest) as plain arrays, no target needed.

        For inspection; resuming uses :meth:`restore_latest`, which restores the exact types.
        Arrays come back on this process's first device, whatever devices and processes wrote
        them (a run over several hosts can be inspected from one).
        """
        step = self.steps()[-1] if step is None else step
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              self._manager.item_metadata(step)["state"])
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def restore_latest(self, target: Any) -> Optional[tuple[int, Any, dict]]:
        """The newest restorable ``(step, state, meta)``, or None when there is no checkpoint.

        Args:
          target: a pytree shaped like the saved state (arrays or ``jax.ShapeDtypeStruct``s); it
            gives the restored leaves their types (e.g. optax NamedTuples) and shardings. Or a
            function of a checkpoint's on-disk metadata tree returning that pytree (to adopt a
            part whose layout may differ between versions).

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds another structure or
            shapes than ``target`` (written by another model or optimizer); nothing is moved.
          CheckpointError: checkpoints exist but none restores.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                on_disk = self._manager.item_metadata(step)["state"]
                if on_disk is None:
                    raise ValueError("no metadata")
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                failures.append((step, e))
                self._set_aside(step, e)
                continue
            wanted = target(on_disk) if callable(target) else target
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
            differences = _differences(_leaf_shapes(on_disk), _leaf_shapes(abstract))
            if differences:
                raise CheckpointMismatchError(
                    f"The checkpoint at step {step} in {self.directory} holds another train "
                    f"state than this run builds ({differences}): it was written with another "
                    "model or optimizer configuration. Resume with the configuration that wrote "
                    "it, or use a new workdir. Nothing was changed on disk.")
            try:
                out = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                restored = (step, out["state"], dict(out["meta"]))
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                failures.append((step, e))
                self._set_aside(step, e)
                continue
            return restored
        if failures:
            detail = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
            raise CheckpointError(
                f"No checkpoint in {self.directory} could be restored ({detail}). The unreadable "
                "ones were moved aside with a '.corrupt' suffix; remove the directory (or choose "
                "another workdir) to start from scratch.")
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        # Keep the bytes for inspection, but out of orbax's way: otherwise the next save at this
        # step would collide with it, or retention would count it as the newest checkpoint.
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt-{int(time.time())}"
        warnings.warn(f"Checkpoint at step {step} in {self.directory} could not be restored "
                      f"({type(error).__name__}: {error}); moved it to {dst} and trying the "
                      "previous one.", RuntimeWarning, stacklevel=3)
        if jax.process_index() == 0 and os.path.exists(src):  # one rename, however many processes
            os.replace(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"aejax set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

"""Orbax checkpoints of a run: the train state (params, optimizer state, step), JSON metadata,
and a checksum of every leaf, so that a resumed run starts only from the bytes it saved.

Restoring walks back from the newest step: a checkpoint that fails to restore, or whose leaves
do not match their checksums, is moved aside (kept for inspection, never deleted) with a
one-line warning, and the one before it is used. A readable checkpoint whose leaves or shapes
differ from what the run builds (another model or optimizer) is not corrupt: that is a
:class:`CheckpointMismatchError`, and nothing is moved. A failed write (unwritable directory,
full disk), in the foreground or in the background, becomes a :class:`CheckpointError` with one
line to act on. In a multi-process run every process calls every method (orbax coordinates the
writes).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CHECKSUMS = "checksums"  # the item holding the checksums
CHECKSUM_VERSION = 1
_SET_ASIDE = re.compile(r"^\d+\.corrupt-")


class CheckpointError(RuntimeError):
    """Checkpoints could not be written, or none in a directory could be restored."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds another train state than the one asked for (another model or
    optimizer): not corruption, so nothing is moved aside."""


def _first_line(error: Any, limit: int = 200) -> str:
    """The first line of an error (TensorStore errors run to many lines), cut to about ``limit``
    characters: its head and its tail, where TensorStore puts the cause ("No space left")."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    if len(line) > limit:
        line = f"{line[:limit // 2]} ... {line[-(limit // 2):]}"
    return f"{type(error).__name__}: {line}" if isinstance(error, BaseException) else line


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


# --------------------------------------------------------------------------- checksums


def _host_values(leaf: Any) -> Optional[np.ndarray]:
    """A leaf's values on this host, or None where no process holds all of them (a sharded,
    not replicated array of a multi-process run) or they are not numbers."""
    if isinstance(leaf, jax.Array):
        if leaf.is_fully_replicated:  # one copy is enough (and on one device: a cheap copy)
            leaf = leaf.addressable_data(0)
        elif not leaf.is_fully_addressable:
            return None
    values = np.asarray(leaf)
    return None if values.dtype == object else values


def leaf_checksums(tree: Any) -> dict:
    """``{path: {"crc32", "dtype", "shape"}}`` of the leaves of ``tree`` this host holds in full.

    ``path`` is the leaf's path joined with ``/``; ``crc32`` is ``zlib.crc32`` of its bytes in
    C order. Costs a copy to the host of each device array, and about 1 ms per MB on a CPU.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        values = _host_values(leaf)
        if values is None:
            continue
        flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        out["/".join(_path_key(path))] = {"crc32": zlib.crc32(flat), "dtype": str(values.dtype),
                                          "shape": list(values.shape)}
    return out


def _corrupt_leaves(tree: Any, recorded: dict) -> list[str]:
    """Paths of the leaves of ``tree`` whose bytes differ from the ``recorded`` checksums.

    A leaf restored as another dtype than it was saved (a cast on restore) cannot be compared
    bytewise and is not counted; nor is a leaf without a recorded checksum.
    """
    now = leaf_checksums(tree)
    return sorted(p for p, want in recorded.items()
                  if p in now and now[p]["dtype"] == want.get("dtype")
                  and now[p]["crc32"] != want.get("crc32"))


def _mismatches(paths: list[str]) -> str:
    what = ("leaf differs from its checksum" if len(paths) == 1
            else "leaves differ from their checksums")
    return (f"{len(paths)} {what}: {', '.join(paths[:3])}"
            f"{' and more' if len(paths) > 3 else ''}")


# --------------------------------------------------------------------------- orbax's noise


class _OrbaxErrorsToDebug(logging.Filter):
    """Orbax logs a failed write with a traceback from each of its threads; :class:`Checkpoints`
    raises the failure as one :class:`CheckpointError`, so those records go to DEBUG here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        log.debug("orbax: %s", _first_line(record.getMessage()))
        return False


def _late_callbacks_to_debug(previous):
    # After a failed write orbax closes its event loop while TensorStore still finishes the
    # other writes; their callbacks then fail with "Event loop is closed", which TensorStore
    # reports through sys.unraisablehook as a traceback each. Nothing is lost by dropping them.
    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            log.debug("a TensorStore callback after orbax's event loop closed: %s", error)
            return
        previous(unraisable)

    hook.aejax_checkpoints = True
    return hook


def _quiet_orbax_errors() -> None:
    absl_logger = logging.getLogger("absl")  # orbax logs through absl.logging
    if not any(isinstance(f, _OrbaxErrorsToDebug) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxErrorsToDebug())
    if not getattr(sys.unraisablehook, "aejax_checkpoints", False):
        sys.unraisablehook = _late_callbacks_to_debug(sys.unraisablehook)


def _release(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    """Lets the background threads of a failed orbax save end now.

    When a save fails before it signals its threads to go on (e.g. its directory could not be
    made), they wait for that signal for orbax's coordination timeout (300 s), and as
    non-daemon threads they hold the interpreter at exit that long. Given the signal, they run
    their part of the write, which fails at once where the directory is missing, and end; they
    are waited for (up to ``timeout`` seconds) so that none writes after the failure is raised.
    (Cancelling them instead would leave their coroutines never awaited, a warning each.)
    Uses orbax internals, so it is best effort: any surprise leaves them to their timeout.
    """
    try:
        from orbax.checkpoint._src.futures import future as ocp_future

        waiting = [t for t in threads
                   if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]
        for t in waiting:
            ocp_future.set_signals(t._receive_signals, operation_id=t._operation_id)
        deadline = time.monotonic() + timeout
        for t in waiting:  # Thread.join: orbax's own join raises the thread's error
            threading.Thread.join(t, max(0.0, deadline - time.monotonic()))
    except Exception as e:  # noqa: BLE001 - only a faster exit is at stake
        log.debug("could not release orbax's threads: %s", _first_line(e))


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Periodic checkpoints of a pytree ``state`` plus a JSON-able ``meta`` dict, verified on
    restore by a checksum of every leaf.

    On disk, step ``N`` is orbax's directory ``N/`` holding three items, written together
    (orbax renames the step into place only once all of them are complete):

    - ``state/``: the pytree, as ``StandardSave`` writes it;
    - ``meta/metadata``: the caller's JSON dict;
    - ``checksums/metadata``: JSON ``{"version": 1, "algorithm": "zlib.crc32", "leaves":
      {PATH: {"crc32": INT, "dtype": "float32", "shape": [...]}}}``, ``PATH`` being the leaf's
      path joined with ``/`` (``state/params/encoder_0/kernel``): see :func:`leaf_checksums`.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: newest checkpoints kept.
      async_save: write in a background thread (the train loop goes on meanwhile); a failure
        there is raised by the next :meth:`save`, :meth:`wait` or :meth:`close`.

    Raises:
      CheckpointError: ``directory`` is a file, or cannot be created.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"Cannot keep checkpoints in {self.directory}: it is a file, not a directory. "
                "Move or remove that file, or choose another workdir.")
        _quiet_orbax_errors()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self._pending: Optional[int] = None  # the step of a save that may still be running
        self._threads: list[threading.Thread] = []  # the background threads of that save
        self._manager = self._call("create or open the checkpoints", self._open)

    def _open(self) -> ocp.CheckpointManager:
        # Handlers given up front (not learnt from the first save or restore): read() needs the
        # metadata of a checkpoint before restoring anything from it.
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
            CHECKSUMS: ocp.JsonCheckpointHandler()})

    def _call(self, what: str, fn: Callable[[], Any], *,
              advice: str = "Check that it is a directory you can write to, or choose "
                            "another workdir.") -> Any:
        """``fn()``, with any failure raised as one :class:`CheckpointError` about ``what``."""
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types
            raise CheckpointError(
                f"Could not {what} in {self.directory} ({_first_line(e)}). {advice}") from e

    def _write_failed(self, step: Optional[int], error: Exception) -> CheckpointError:
        _release(self._threads)
        self._pending, self._threads = None, []
        done = [s for s in self._safe_steps() if s != step]
        kept = (f"the checkpoint of step {done[-1]} is intact" if done
                else "no earlier checkpoint exists")
        return CheckpointError(
            f"Could not write the checkpoint{'' if step is None else f' of step {step}'} to "
            f"{self.directory} "
            f"({_first_line(error)}); {kept}. Make the directory writable or free space on its "
            "disk (or choose another workdir), then run again to resume.")

    def _safe_steps(self) -> list[int]:
        try:
            return self.steps()
        except Exception:  # noqa: BLE001 - only used to word an error
            return []

    def steps(self) -> list[int]:
        return sorted(self._call("list the checkpoints", self._manager.all_steps))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = True) -> None:
        """Saves ``state``, ``meta`` and the checksums of ``state``'s leaves as ``step``.

        Waits for an earlier async save first.

        Raises:
          CheckpointError: this write, or the earlier async one, failed. The checkpoints
            written before it are intact.
        """
        self.wait()
        # Before orbax returns: the caller's next step may donate (delete) these arrays.
        checksums = {"version": CHECKSUM_VERSION, "algorithm": "zlib.crc32",
                     "leaves": leaf_checksums(state)}
        before = set(threading.enumerate())
        self._pending = step
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                **{CHECKSUMS: ocp.args.JsonSave(checksums)}), force=force)
        except Exception as e:  # noqa: BLE001 - any failure to start the write
            self._threads = [t for t in threading.enumerate() if t not in before]
            raise self._write_failed(step, e) from e
        self._threads = [t for t in threading.enumerate() if t not in before]
        if not self._options.enable_async_checkpointing:
            self._pending, self._threads = None, []

    def wait(self) -> None:
        """Waits for an async save to finish.

        Raises:
          CheckpointError: it failed (its step was not written; earlier ones are intact).
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a failed background write
            raise self._write_failed(self._pending, e) from e
        self._pending, self._threads = None, []

    def close(self) -> None:
        """Waits for an async save, then releases orbax's resources; never hangs on a failed save.

        Raises:
          CheckpointError: the async save failed (the resources are released all the same).
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 - a failure already raised by wait()
                log.debug("closing the checkpoint manager: %s", _first_line(e))

    def read(self, step: Optional[int] = None) -> tuple[Any, dict]:
        """``(state, meta)`` saved at ``step`` (default: newest) as plain arrays, no target needed.

        For inspection; resuming uses :meth:`restore_latest`, which restores the exact types.
        Arrays come back on this process's first device, whatever devices and processes wrote
        them (a run over several hosts can be inspected from one).

        Raises:
          CheckpointError: there is no checkpoint, it cannot be read, or its leaves do not
            match their checksums (nothing is moved).
        """
        if step is None:
            steps = self.steps()
            if not steps:
                raise CheckpointError(f"No checkpoint in {self.directory}.")
            step = steps[-1]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def restore():
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  self._manager.item_metadata(step)["state"])
            return self._restore(step, target)

        state, meta, bad = self._call(f"read the checkpoint of step {step}", restore,
                                      advice="It is incomplete or damaged.")
        if bad:
            raise CheckpointError(f"The checkpoint of step {step} in {self.directory} is corrupt: "
                                  f"{_mismatches(bad)}.")
        return state, meta

    def _has_checksums(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), CHECKSUMS))

    def _restore(self, step: int, abstract: Any) -> tuple[Any, dict, list[str]]:
        """``(state, meta, paths of leaves that fail their checksums)`` of ``step``."""
        items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        verified = self._has_checksums(step)
        if verified:
            items[CHECKSUMS] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        bad = _corrupt_leaves(out["state"], out[CHECKSUMS]["leaves"]) if verified else []
        return out["state"], dict(out["meta"]), bad

    def restore_latest(self, target: Any, *, start_fresh_if_unreadable: bool = False
                       ) -> Optional[tuple[int, Any, dict]]:
        """The newest verified ``(step, state, meta)``, or None when there is no checkpoint.

        Every restored leaf is checked against the checksum saved with it; a checkpoint that
        fails to restore or to verify is moved aside to ``STEP.corrupt-TIME`` (never deleted)
        with a one-line warning, and the step before it is tried. Checkpoints written before
        checksums were saved restore unverified: they are accepted as they are.

        Args:
          target: a pytree shaped like the saved state (arrays or ``jax.ShapeDtypeStruct``s); it
            gives the restored leaves their types (e.g. optax NamedTuples) and shardings. Or a
            function of a checkpoint's on-disk metadata tree returning that pytree (to adopt a
            part whose layout may differ between versions).
          start_fresh_if_unreadable: when checkpoints exist (or were moved aside before) but
            none verifies, return None (start afresh) instead of raising.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint holds another structure or
            shapes than ``target`` (written by another model or optimizer); nothing is moved.
          CheckpointError: checkpoints exist, or were moved aside earlier, but none verifies.
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                on_disk = self._manager.item_metadata(step)["state"]
                if on_disk is None:
                    raise ValueError("no metadata")
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                failures.append(step)
                self._set_aside(step, f"could not be read ({_first_line(e)})")
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
                state, meta, bad = self._restore(step, abstract)
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                failures.append(step)
                self._set_aside(step, f"could not be restored ({_first_line(e)})")
                continue
            if bad:
                failures.append(step)
                self._set_aside(step, f"is corrupt ({_mismatches(bad)})")
                continue
            return step, state, meta
        earlier = sorted(n for n in self._listdir() if _SET_ASIDE.match(n))
        if not failures and not earlier:
            return None
        what = (f"none of the {len(failures)} checkpoints in {self.directory} verifies (each was "
                "moved aside to STEP.corrupt-TIME)" if failures else
                f"{self.directory} holds no checkpoint but {len(earlier)} moved aside as corrupt "
                f"({', '.join(earlier[:3])})")
        if start_fresh_if_unreadable:
            log.warning("Starting afresh: %s.", what)
            return None
        raise CheckpointError(
            f"Cannot resume: {what}. To start from scratch, move that directory away (e.g. "
            f"mv {self.directory} {self.directory}.bad), or pass start_fresh_if_unreadable=True "
            "(on the command line: --config.start_fresh_if_unreadable=True).")

    def _listdir(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except OSError:
            return []

    def _set_aside(self, step: int, why: str) -> None:
        # Keep the bytes for inspection, but out of orbax's way: otherwise the next save at this
        # step would collide with it, or retention would count it as the newest checkpoint.
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt-{int(time.time())}"
        n = 1
        while os.path.exists(dst):  # a step set aside twice within a second
            dst, n = f"{src}.corrupt-{int(time.time())}-{n}", n + 1
        warnings.warn(f"Checkpoint at step {step} in {self.directory} {why}; moved it to {dst} "
                      "and trying the previous one.", RuntimeWarning, stacklevel=3)
        if jax.process_index() == 0 and os.path.exists(src):  # one rename, however many processes
            os.replace(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"aejax set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

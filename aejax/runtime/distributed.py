"""Several processes (hosts) in one run: starting ``jax.distributed``, each process's part of the data.

Every process runs the same program on the same global arrays; what differs is which rows of
each global batch it feeds (:func:`process_rows`) and which part of an evaluation split it reads
(:func:`even_split`, as ``tfds.split_for_jax_process``).
"""

from __future__ import annotations

import os
import sys

import jax


class PeerLostError(RuntimeError):
    """Another process of a multi-process run stopped answering (it died or was killed)."""


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               initialization_timeout: int = 300, heartbeat_timeout: int = 60) -> bool:
    """Starts ``jax.distributed`` once per process; later calls with the same settings do nothing.

    Must run before anything touches a device (``jax.devices()``, any array).

    Args:
      coordinator_address: ``host:port`` of process 0 (which serves it); ``""`` keeps JAX
        single-process.
      num_processes: processes in the run.
      process_id: this process, in ``range(num_processes)``.
      initialization_timeout: seconds to wait for every process to connect.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and
        the others are stopped (they abort if no collective of theirs has failed first).

    Returns:
      Whether this process is part of a multi-process run.

    Raises:
      ValueError: a second call with other settings, or a call after JAX started single-process.
    """
    if not coordinator_address:
        return False
    if jax.distributed.is_initialized():
        current = (jax.process_count(), jax.process_index())
        if current != (num_processes, process_id):
            raise ValueError(f"jax.distributed already runs as process {current[1]} of {current[0]}; "
                             f"this process cannot also be process {process_id} of {num_processes}.")
        return True
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise
        raise ValueError("jax.distributed must start before JAX uses any device: start the run "
                         "in a fresh process (experiments.main does), or call "
                         "aejax.distributed.initialize before anything else.") from None
    return True


def even_split(num_examples: int, num_parts: int, index: int) -> slice:
    """Rows of part ``index`` when ``num_examples`` rows are cut into ``num_parts`` near-equal parts.

    As ``tfds.even_splits(..., drop_remainder=False)`` (what ``tfds.split_for_jax_process``
    uses): the first ``num_examples % num_parts`` parts hold one row more; no row is dropped.
    """
    base, extra = divmod(num_examples, num_parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def process_rows(global_batch_size: int) -> slice:
    """The rows of every global batch that this process feeds: its contiguous ``1/P`` share.

    A global array split on its first axis over a mesh of all devices (sorted by process, as
    ``jax.make_mesh`` orders them) holds process ``p``'s rows at ``[p * B / P, (p + 1) * B / P)``.
    """
    count, index = jax.process_count(), jax.process_index()
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` (raised by a collective or a checkpoint barrier) means a peer is gone."""
    text = str(error)
    return jax.process_count() > 1 and any(s in text for s in (
        "Gloo", "gloo", "Connection closed by peer", "Connection reset", "heartbeat",
        "CoordinationService", "UNAVAILABLE", "DEADLINE_EXCEEDED"))


def exit_without_shutdown(code: int) -> None:
    """Ends the process now, flushing stdout and stderr, with exit status ``code``.

    After a peer died, the normal exit runs ``jax.distributed.shutdown``, whose barrier waits for
    the dead peer and then aborts the process (SIGABRT); this exit skips it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

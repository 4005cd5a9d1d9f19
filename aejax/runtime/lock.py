"""One writer per workdir: a lock file held with ``flock`` for as long as a run lives.

The kernel releases an ``flock`` when its process dies, however it dies, so a lock left by a
killed run never blocks the next one; the file itself keeps the last holder's pid, host and
start time, which name the holder when a second run is refused.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

LOCK_NAME = ".aejax.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` the run in ``workdir`` is the only one writing there."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: Optional[int] = None

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                h = json.load(f)
            return f"process {h['pid']} on {h['host']} (started {h['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            workdir = os.path.dirname(self.path)
            raise WorkdirLockedError(
                f"The workdir {workdir} is in use by {self._holder()}. Wait for that run to "
                "finish (or stop it), or choose another --workdir.") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

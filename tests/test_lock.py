"""Tests of aejax.runtime.lock: one writer per workdir, across processes, released on death."""

import os
import signal
import subprocess
import sys
import time

import pytest

from aejax.runtime import lock

HOLD = """
import sys, time
from aejax.runtime import lock
with lock.WorkdirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_another_process_is_refused_with_its_holder_named_and_released_on_kill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        t = time.time()
        with pytest.raises(lock.WorkdirLockedError, match=rf"in use by process {proc.pid} on "):
            lock.WorkdirLock(str(tmp_path)).acquire()
        assert time.time() - t < 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # A holder killed without a word leaves its file; the kernel released its lock.
    assert os.path.exists(tmp_path / lock.LOCK_NAME)
    with lock.WorkdirLock(str(tmp_path)):
        pass


def test_the_lock_is_released_on_exit_and_reentrant_in_sequence(tmp_path):
    with lock.WorkdirLock(str(tmp_path)):
        with pytest.raises(lock.WorkdirLockedError):
            lock.WorkdirLock(str(tmp_path)).acquire()
    with lock.WorkdirLock(str(tmp_path)):
        pass

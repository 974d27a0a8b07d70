"""The spool's daemon lock: one holder; the kernel drops it when the holder dies, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from throttler.spool.daemon_lock import LOCK_NAME, DaemonLock, SpoolInUse

HOLD = """
import sys, time
from throttler.spool.daemon_lock import DaemonLock
DaemonLock(sys.argv[1], "the-spool").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_daemon_is_refused_naming_the_holder_then_takes_it_once_the_holder_is_killed(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(SpoolInUse) as refused:
            DaemonLock(tmp_path, "/srv/spool").acquire()
        assert str(refused.value) == (f"spool /srv/spool is in use by another throttler serve (pid {holder.pid}): "
                                      "stop it first, or give this daemon a spool of its own")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    lock = DaemonLock(tmp_path, "/srv/spool").acquire()  # SIGKILL left no stale lock behind
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    lock.release()


def test_release_lets_the_next_daemon_in_and_the_lock_is_not_inherited(tmp_path):
    first = DaemonLock(tmp_path, "s").acquire()
    with pytest.raises(SpoolInUse):
        DaemonLock(tmp_path, "s").acquire()  # a second descriptor, even in the same process
    assert os.get_inheritable(first._fd) is False  # a worker process started by the daemon cannot keep it
    first.release()
    DaemonLock(tmp_path, "s").acquire().release()

"""One daemon per spool: an exclusive lock the daemon holds for its whole life.

Two daemons on one spool would undo each other: the second's start-up
recovery puts the first's running claims back in ``incoming/`` (a group run
twice, its requests closed twice), and its sweep removes the first's
temporary outputs while they are being written. ``throttler serve`` therefore
takes ``<spool>/state/daemon.lock`` with ``flock(LOCK_EX | LOCK_NB)`` before
it recovers or sweeps anything, and refuses to start when another process
holds it. The kernel drops the lock when its holder ends, however it ends
(SIGKILL, the OOM killer, a crash), so a dead daemon never blocks the next
start and no stale-lock clean-up is needed. The file holds the holder's pid,
for the refusal message only.

The spool must be on a local file system (it already relies on atomic renames
and ``fsync`` of directories); on NFS, Linux turns ``flock`` into an NFS lock
that the server arbitrates.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from throttler.errors import ThrottlerError

#: the lock file, under the spool's state directory
LOCK_NAME = "daemon.lock"


class SpoolInUse(ThrottlerError):
    """Another daemon holds the spool's lock."""


class DaemonLock:
    """The spool's daemon lock: :meth:`acquire` or refuse; :meth:`release` when the daemon stops."""

    def __init__(self, state_dir: str | os.PathLike, spool_root: str | os.PathLike):
        self.path = Path(state_dir) / LOCK_NAME
        self.spool_root = str(spool_root)
        self._fd: int | None = None

    def acquire(self) -> "DaemonLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SpoolInUse(f"spool {self.spool_root} is in use by another throttler serve ({holder}): stop it "
                             "first, or give this daemon a spool of its own") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "its pid not recorded"

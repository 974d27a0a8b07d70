"""Crash-safe writes: fsync a file and its directory, replace a file atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON so readers see the old or the new file, never a torn one.

    Temp file in the same directory, fsync, rename over the target, fsync
    the directory (a file's fsync does not persist its directory entry).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".estimator-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

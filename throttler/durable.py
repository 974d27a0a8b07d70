"""Crash-safe writes: fsync a directory, replace a file atomically.

The one home of both. A file's fsync does not persist its directory entry, so
every write that must survive a crash fsyncs the directory after the rename
(or link) that names the file. The spool's never-replace write
(:func:`throttler.spool.files.write_durable`) links instead of renaming and
uses :func:`fsync_dir` from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid

TMP_SUFFIX = ".tmp"  #: temporary names are ``.<name>.<12 hex>.tmp`` beside the target


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a directory's entries (fsync of a file does not persist its name)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: str | os.PathLike) -> str:
    """A fresh temporary name beside ``path``: ``.<name>.<12 hex>.tmp``."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o600):
    """An unbuffered binary file that atomically replaces ``path`` when the block ends.

    Created exclusively under a temporary name with ``mode``; fsynced, renamed
    over ``path`` and its directory fsynced when the block ends; removed if the
    block raises. Readers see the old file or the new one, never a torn one.
    """
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, mode), "wb", buffering=0) as fh:
            yield fh
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`replacing`)."""
    view = memoryview(data)
    with replacing(path, mode) as fh:
        while view:
            view = view[fh.write(view):]


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON so readers see the old or the new file, never a torn one."""
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))

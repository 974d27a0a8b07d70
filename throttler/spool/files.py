"""File-system helpers of the spool: crash-safe writes, reads through O_NOFOLLOW, removal."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

from throttler.durable import fsync_dir
from throttler.spool.requests import FILE_MODE, MAX_REQUEST_BYTES, BadRequest

log = logging.getLogger(__name__)

def _write_fsync(fd: int, data: bytes) -> None:
    os.fchmod(fd, FILE_MODE)  # exact mode, whatever the umask
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def remove(path: Path) -> None:
    """Remove a file, symlink (never its target) or directory tree; gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cannot remove %s: %s", path, err)


def listdir(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return [entry.name for entry in entries]


def read_request(path: Path, st: os.stat_result) -> bytes:
    """Read a request's bytes through O_NOFOLLOW, checking it is the file ``st`` saw."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise BadRequest(f"request unreadable: {err.strerror}", reason_class="other") from None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise FileNotFoundError(f"request {path} replaced while read")  # rescan sees the new one
        chunks, size = [], 0
        while size <= MAX_REQUEST_BYTES and (chunk := os.read(fd, MAX_REQUEST_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_REQUEST_BYTES:
        raise BadRequest("request too large", reason_class="too_large")
    return b"".join(chunks)


def write_durable(tmp_dir: Path, dest_dir: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as ``dest_dir/name`` crash-safely, never replacing a file.

    A tmp file with O_EXCL, fsync, a hard link into place (EEXIST rather than an
    overwrite), then fsync of ``dest_dir`` so the new name survives a crash.
    """
    tmp = tmp_dir / f"{unique_name('w')}.tmp"
    dest = dest_dir / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            _write_fsync(fd, data)
        finally:
            os.close(fd)
        os.link(tmp, dest)
    finally:
        os.unlink(tmp)
    fsync_dir(dest_dir)
    return dest


def encode_record(record: dict) -> bytes:
    """A record as one line of JSON (non-JSON values become their str())."""
    return json.dumps(record, sort_keys=True, default=str).encode() + b"\n"


def unique_name(prefix: str) -> str:
    """A name unique across processes and hosts: prefix, time, pid, random."""
    return f"{prefix}.{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"


def safe_name(name: str) -> str:
    """A file name as printable, JSON-safe text (undecodable bytes become ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")

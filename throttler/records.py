"""What lies in the spool's files, and how they are written safely.

Request names and JSON (validated strictly, never evaluated), printable names for
records, and the crash-safe write used for every request and record: a tmp/ file
created with O_EXCL, fsynced, hard-linked into place, and the directory fsynced
(FACTS.md "Queue directories": fsync of a file does not persist its name).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from throttler import groupid
from throttler.errors import RequestError
from throttler.plan import STRATEGY_CHOICES

log = logging.getLogger(__name__)

JSON_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.json")  #: a JSON request name
MAX_REQUEST_BYTES = 64 * 1024  #: larger request files are refused unread
MAX_PRIORITY = 2**31 - 1  #: priorities lie in [-MAX_PRIORITY, MAX_PRIORITY]
DIR_MODE = 0o750
FILE_MODE = 0o640
RECORD_KINDS = ("done", "failed")
_REQUEST_KEYS = frozenset({"group", "strategy", "priority"})


#: Why a request was refused, as a bounded class: the ``reason`` label of the
#: ``throttler_requests_rejected_total`` metric and ``reason_class`` in its record.
REFUSAL_CLASSES = ("validation", "symlink", "ownership", "too_large", "invalid_json", "other")


class BadRequest(RequestError):
    """A refused request; ``group`` is set when the request named a valid group.

    ``reason`` is the text for people (the failed record, the log);
    ``reason_class`` one of :data:`REFUSAL_CLASSES`, for metrics.
    """

    def __init__(self, reason: str, group: str | None = None, reason_class: str = "validation"):
        if reason_class not in REFUSAL_CLASSES:
            raise ValueError(f"reason_class must be one of {REFUSAL_CLASSES}, not {reason_class!r}")
        super().__init__(reason)
        self.reason = reason
        self.group = group
        self.reason_class = reason_class


def validate_group(group: object) -> str:
    """Return ``group`` if it is a safe group ID, else raise :class:`BadRequest`.

    The rule is :func:`throttler.groupid.validate_group`, shared with the catalog
    and the outputs (group IDs name output files): no path separator, no leading
    dot, no ``..``, no control character, at most 128 characters.
    """
    try:
        return groupid.validate_group(group)
    except RequestError as err:
        raise BadRequest(str(err)[:300]) from None


def is_group(value: object) -> bool:
    """True if ``value`` is a valid group ID."""
    try:
        validate_group(value)
    except BadRequest:
        return False
    return True


def check_fields(group: object, strategy: object, priority: object) -> None:
    """Raise :class:`BadRequest` unless the three request fields are well typed.

    ``strategy`` None means "the daemon's configured default".
    """
    validate_group(group)
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGY_CHOICES):
        raise BadRequest(f"unknown strategy {strategy!r:.50}", group)
    if type(priority) is not int or abs(priority) > MAX_PRIORITY:
        raise BadRequest(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}]", group)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in object")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_request_json(data: bytes) -> tuple[str, str, int]:
    """Return ``(group, strategy, priority)`` from a JSON request's bytes.

    Only plain JSON is accepted: an object with ``group`` (required), ``strategy``
    (default ``auto``) and ``priority`` (default 0) and no other key.
    """
    try:
        doc = json.loads(
            data.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadRequest(f"invalid JSON: {err}"[:300], reason_class="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("request JSON must be an object", reason_class="invalid_json")
    if "group" not in doc:
        raise BadRequest("request JSON has no group", reason_class="invalid_json")
    group = validate_group(doc["group"])
    unknown = sorted(set(doc) - _REQUEST_KEYS)
    if unknown:
        raise BadRequest(f"unknown keys in request: {unknown!r:.200}", group, "invalid_json")
    strategy, priority = doc.get("strategy"), doc.get("priority", 0)
    check_fields(group, strategy, priority)
    return group, strategy, priority


def check_name(name: str) -> bool:
    """Validate a request file name (may hold surrogate escapes); True for JSON requests."""
    try:
        text = os.fsencode(name).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request name is not valid UTF-8") from None
    if text.endswith(".json"):
        if JSON_NAME_RE.fullmatch(text) is None:
            raise BadRequest(f"invalid request name {text!r:.300}")
        return True
    validate_group(text)
    return False


def safe_name(name: str) -> str:
    """A file name as printable, JSON-safe text (undecodable bytes become ``\\xNN``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def unique_name(prefix: str) -> str:
    """A name unique across processes and hosts: prefix, time, pid, random."""
    return f"{prefix}.{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (fsync of a file does not persist its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

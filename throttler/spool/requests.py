"""What lies in the spool's files, and how they are written safely.

Request names and JSON (validated strictly, never evaluated), printable names for
records, and the crash-safe write used for every request and record: a tmp/ file
created with O_EXCL, fsynced, hard-linked into place, and the directory fsynced
(the Maildir discipline: fsync of a file does not persist its name; the write
itself is :func:`throttler.spool.files.write_durable`).
"""

from __future__ import annotations

import json
import logging
import os
import re

from throttler import groupid
from throttler.errors import RequestError
from throttler.planning.plan import STRATEGY_CHOICES

log = logging.getLogger(__name__)

JSON_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.json")  #: a JSON request name
MAX_REQUEST_BYTES = 64 * 1024  #: larger request files are refused unread
MAX_PRIORITY = 2**31 - 1  #: priorities lie in [-MAX_PRIORITY, MAX_PRIORITY]
DIR_MODE = 0o750
FILE_MODE = 0o640
RECORD_KINDS = ("done", "failed")
_REQUEST_KEYS = frozenset({"group", "strategy", "priority", "full"})


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


def parse_request_json(data: bytes) -> tuple[str, str, int, bool]:
    """Return ``(group, strategy, priority, full)`` from a JSON request's bytes.

    Only plain JSON is accepted: an object with ``group`` (required), ``strategy``
    (default ``auto``), ``priority`` (default 0) and ``full`` (default false: a
    group whose previous output can be extended reads only its new files; true
    forces a full run) and no other key.
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
    full = doc.get("full", False)
    if type(full) is not bool:
        raise BadRequest("full must be true or false", group)
    return group, strategy, priority, full


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




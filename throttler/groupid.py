"""Group ID validation, shared by the spool, the catalog and the outputs."""

from __future__ import annotations

import re

from throttler.errors import RequestError

GROUP_ID_MAX_CHARS = 128
GROUP_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_group(group: object) -> str:
    """Return ``group`` if it is a safe group ID, else raise RequestError saying why."""
    if not isinstance(group, str):
        raise RequestError(f"group ID must be a string, got {type(group).__name__}")
    if len(group) > GROUP_ID_MAX_CHARS:
        raise RequestError(f"group ID longer than {GROUP_ID_MAX_CHARS} characters")
    if not GROUP_ID_PATTERN.fullmatch(group) or ".." in group:
        raise RequestError(f"invalid group ID {group!r}: allowed are letters, digits, '.', '_', '-',"
                           " starting with a letter or digit, no '..'")
    return group

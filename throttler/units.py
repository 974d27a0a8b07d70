"""Quantities for people: bytes and durations, formatted and parsed.

One formatter for every message that shows a size (the planner's notes, the
admission reasons), and the parsers commands use for sizes and durations given
on the command line or in the configuration file.
"""

from __future__ import annotations

import math
import re

#: Byte units, decimal (powers of 1000) and binary (powers of 1024); case-insensitive.
BYTE_UNITS = {
    "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
#: Duration units in seconds; a plain number is seconds.
DURATION_UNITS_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

_QUANTITY = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def count_of(n: int, noun: str) -> str:
    """``1 file``, ``3 files``: a count and its noun, plural unless the count is one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_bytes(n_bytes: float) -> str:
    """Bytes for people: MiB below 1 GiB, GiB from there."""
    if abs(n_bytes) >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def parse_bytes(text: str | int) -> int:
    """``"2.5GiB"``, ``"16GB"``, ``"12.5 GB"``, ``"4096"`` or an int -> whole bytes.

    Decimal units are powers of 1000, ``*iB`` units powers of 1024; a plain
    number is bytes. Raises ``ValueError`` for anything else, negatives included.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    number, unit = _split(text, "size")
    factor = BYTE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use one of {', '.join(BYTE_UNITS)})")
    return int(round(number * factor))


def parse_rate_bytes_per_second(text: str) -> float:
    """``"12.5GB/s"``, ``"1.25GB"`` (per second implied) or ``"10Gbit/s"`` -> bytes per second."""
    body = re.sub(r"/s$", "", str(text).strip(), flags=re.I)
    if body.lower().endswith("bit"):
        return parse_bytes(body[:-3]) / 8
    return float(parse_bytes(body))


def parse_duration_seconds(text: str | float) -> float:
    """``"30m"``, ``"90s"``, ``"1h"``, ``"2d"``, ``"45"`` or a number -> seconds.

    A plain number is seconds. Raises ``ValueError`` for anything else.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or not math.isfinite(text):
            raise ValueError(f"a duration must be finite and not negative: {text}")
        return float(text)
    number, unit = _split(text, "duration")
    factor = DURATION_UNITS_SECONDS.get(unit.lower() or "s")
    if factor is None:
        raise ValueError(f"unknown duration unit {unit!r} in {text!r} "
                         f"(use one of {', '.join(DURATION_UNITS_SECONDS)})")
    return number * factor


def _split(text: str, what: str) -> tuple[float, str]:
    match = _QUANTITY.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a {what}: {text!r}")
    return float(match.group(1)), match.group(2)

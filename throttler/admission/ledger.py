"""The reservation ledger: memory promised to submitted groups until they end."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Reservation:
    """Memory promised to a submitted group until it finishes."""

    group: str
    key: str  #: unique per submission
    group_peak_bytes: int
    task_peak_bytes: int
    submitted_at_seconds: float
    running_bytes: int = 0  #: the part held by running tasks (0: all of it)


class Ledger:
    """Our reservations by key. Thread-safe; holds its lock only to change the dict."""

    def __init__(self, reservations: Iterable[Reservation] = ()):
        self._lock = threading.Lock()
        self._by_key = {r.key: r for r in reservations}

    def reserve(self, reservation: Reservation) -> None:
        """Add a reservation; a key is reserved once."""
        with self._lock:
            if reservation.key in self._by_key:
                raise KeyError(f"already reserved: {reservation.key}")
            self._by_key[reservation.key] = reservation

    def release(self, key: str) -> Reservation | None:
        """Drop a reservation; releasing an unknown key is a no-op."""
        with self._lock:
            return self._by_key.pop(key, None)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(r.group_peak_bytes for r in self._by_key.values())

    def items(self) -> list[Reservation]:
        """A copy of the reservations, oldest first."""
        with self._lock:
            return sorted(self._by_key.values(), key=lambda r: r.submitted_at_seconds)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

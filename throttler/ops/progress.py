"""How far each running graph has read: files and bytes, from the workers' reports.

:class:`ProgressTracker` subscribes to the event topic the leaf tasks report on
(:mod:`throttler.worker.progress`) and keeps, per task key, the highest counts
reported. A graph's progress is the sum over its keys (every key of a graph
contains its submission token). A leaf that is retried on another worker
starts again from zero; the highest count is kept, so progress never goes
back, and it is capped at the graph's totals.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from throttler.worker.progress import TOPIC

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupProgress:
    """Files and bytes read of a graph's totals."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    def as_dict(self) -> dict:
        return {"files_done": self.files_done, "files_total": self.files_total,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total}


class ProgressTracker:
    """Per-key counts from the workers' progress events. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[int, int]] = {}

    def subscribe(self, client) -> None:
        """Receive the workers' reports through ``client`` (call again after a reconnect)."""
        try:
            client.subscribe_topic(TOPIC, self.on_event)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.warning("cannot subscribe to progress events: %s", exc)

    def on_event(self, event) -> None:
        """A ``(timestamp, msg)`` event from the scheduler (runs on the client's event loop)."""
        try:
            msg = event[1]
            key, files, n_bytes = str(msg["key"]), int(msg["files"]), int(msg["bytes"])
        except (TypeError, KeyError, ValueError, IndexError):
            return
        with self._lock:
            old_files, old_bytes = self._by_key.get(key, (0, 0))
            self._by_key[key] = (max(old_files, files), max(old_bytes, n_bytes))

    def of(self, token: str, files_total: int, bytes_total: int) -> GroupProgress:
        """The progress of the graph whose keys contain ``token``."""
        with self._lock:
            counts = [v for k, v in self._by_key.items() if token in k]
        files = min(files_total, sum(f for f, _ in counts))
        n_bytes = min(bytes_total, sum(b for _, b in counts))
        return GroupProgress(files, files_total, n_bytes, bytes_total)

    def forget(self, token: str) -> None:
        """Drop a finished graph's counts."""
        with self._lock:
            for key in [k for k in self._by_key if token in k]:
                del self._by_key[key]

"""Files read so far by the running task, reported to the client as Dask events.

A leaf task calls :meth:`FileProgress.add` after each file; the report is a
``log_event`` on the worker (topic :data:`TOPIC`), which the scheduler relays
to subscribed clients (:mod:`throttler.ops.progress`). Reports are cumulative
per task key and sent at most every :data:`REPORT_EVERY_SECONDS`, plus once
when the task's files are all read, so a group of thousands of files costs a
few events a second per worker. Outside a Dask worker (tests, the synchronous
scheduler) nothing is sent.
"""

from __future__ import annotations

import time

TOPIC = "throttler-progress"
REPORT_EVERY_SECONDS = 0.5


class FileProgress:
    """Counts one task's files and bytes read; sends them now and then."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._worker, self._key = _current_task()
        self.files = 0
        self.bytes = 0
        self._sent_at_seconds = clock()

    def add(self, n_bytes: int) -> None:
        self.files += 1
        self.bytes += int(n_bytes)
        if self._clock() - self._sent_at_seconds >= REPORT_EVERY_SECONDS:
            self.send()

    def send(self) -> None:
        """Report the counts so far (never raises: progress must not fail a task)."""
        self._sent_at_seconds = self._clock()
        if self._worker is None:
            return
        try:
            self._worker.log_event(TOPIC, {"key": self._key, "files": self.files, "bytes": self.bytes})
        except Exception:  # noqa: BLE001 - best effort
            pass


def _current_task():
    """(worker, key of the task running in this thread), or (None, None) off a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker, str(worker.get_current_task())
    except Exception:  # noqa: BLE001 - not in a worker thread
        return None, None

"""Waking the daemon when requests arrive: inotify, with a periodic rescan as backstop."""

from __future__ import annotations

import logging
import threading

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from throttler.spool.queue import Spool

log = logging.getLogger(__name__)

class _WakeHandler(FileSystemEventHandler):
    """When a file appears in incoming/: tell the spool to list it again, then wake the daemon."""

    def __init__(self, wake: threading.Event, spool: Spool):
        self._wake = wake
        self._spool = spool

    def on_created(self, event) -> None:
        self._spool.note_arrival()
        self._wake.set()

    def on_moved(self, event) -> None:
        self._spool.note_arrival()
        self._wake.set()


class SpoolWatcher:
    """Wakes the daemon on new requests: inotify (watchdog) plus a periodic rescan.

    inotify drops events on overflow and sees nothing written by other NFS clients,
    so ``wake`` is also set every ``rescan_seconds``. If the observer cannot start
    (e.g. the inotify limit), a warning is logged and only the rescans remain.
    """

    def __init__(self, spool: Spool, wake: threading.Event, rescan_seconds: float = 5.0):
        self.spool = spool
        self.wake = wake
        self.rescan_seconds = rescan_seconds
        self._stop = threading.Event()
        self._observer = None
        self._ticker: threading.Thread | None = None

    @property
    def watching(self) -> bool:
        """True while the inotify observer runs."""
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._observer = self._start_observer()
        self._ticker = threading.Thread(target=self._tick_loop, name="spool-rescan", daemon=True)
        self._ticker.start()

    def _start_observer(self):
        events = [FileCreatedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent]
        try:
            observer = Observer()
            handler = _WakeHandler(self.wake, self.spool)
            observer.schedule(handler, str(self.spool.root / "incoming"), event_filter=events)
            observer.start()
            return observer
        except Exception as err:  # inotify limits, unsupported file system...
            log.warning("spool watch unavailable (%s); rescanning every %.1f s", err, self.rescan_seconds)
            return None

    def tick(self) -> None:
        """One rescan step: the next scan lists incoming/ again (catching what inotify missed); wake the daemon."""
        self.spool.note_arrival()
        self.wake.set()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.rescan_seconds):
            self.tick()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        self._stop.set()
        stop_threads(self._observer, self._ticker, timeout_seconds)
        self._observer = self._ticker = None


def stop_threads(observer, ticker: threading.Thread | None, timeout_seconds: float) -> None:
    """Stop a watchdog observer and join it and a ticker thread (either may be None)."""
    if observer is not None:
        observer.stop()
        observer.join(timeout_seconds)
    if ticker is not None:
        ticker.join(timeout_seconds)

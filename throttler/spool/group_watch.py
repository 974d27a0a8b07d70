"""``serve --watch``: queue a group when the files of its directory change, debounced.

A watchdog (inotify) observer on the data root sees every file created,
written, moved or deleted under ``<data root>/<group>/``. Each event of a
``.parquet`` name (not a dot-name: writers' temporaries) marks the group; once
the group has been quiet for ``watch_debounce_seconds`` and has no run in the
daemon, one request for it is written to the spool's ``incoming/`` exactly as
``throttler submit`` writes it. The queue directory stays the one intake:
records, coalescing, priorities and the spool's guarantees are unchanged.

Why wait for the group to have no run: a request that arrives while its group
runs is coalesced into that run, which may have fingerprinted the group's
files before the change. A group marked while it runs is queued when that run
ends, so the next run (incremental, or unchanged) sees the change. A group
whose request is written while no run holds it is claimed after the change.

Limits: local data roots without a manifest only (an object store sends no
events; a manifest's groups are not directories). A writer that pauses longer
than the debounce mid-file can have a half-written file read (the group fails,
naming the file, and its next change queues it again): write under a dot-name
or elsewhere, then rename into place. inotify watches one descriptor per
directory (``fs.inotify.max_user_watches``); overflowed events are lost (the
next change of the group queues it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from throttler.spool.requests import is_group
from throttler.spool.watcher import stop_threads

log = logging.getLogger(__name__)


class Debouncer:
    """Which marked keys are due: quiet for ``quiet_seconds`` and not busy (pure)."""

    def __init__(self, quiet_seconds: float):
        self.quiet_seconds = quiet_seconds
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, key: str, now: float) -> None:
        with self._lock:
            self._last[key] = now

    def take_due(self, now: float, busy: Callable[[str], bool]) -> list[str]:
        """Keys quiet long enough and not busy, in the order they were last marked; forgotten once taken."""
        with self._lock:
            due = [k for k, t in sorted(self._last.items(), key=lambda kv: kv[1])
                   if now - t >= self.quiet_seconds and not busy(k)]
            for key in due:
                del self._last[key]
        return due

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._last)


def group_of(data_root: str, path: str) -> str | None:
    """The group of an event's path: ``<root>/<group>/<name>.parquet``, else None."""
    rel = os.path.relpath(path, data_root)
    parts = rel.split(os.sep)
    if len(parts) != 2 or parts[0] in (os.curdir, os.pardir) or not is_group(parts[0]):
        return None
    name = parts[1]
    return parts[0] if name.endswith(".parquet") and not name.startswith(".") else None


class _Marker(FileSystemEventHandler):
    def __init__(self, data_root: str, note: Callable[[str], None]):
        self._root, self._note = data_root, note

    def on_any_event(self, event) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            group = group_of(self._root, os.fsdecode(path)) if path else None
            if group is not None:
                self._note(group)


class GroupWatcher:
    """Watches ``data_root``; writes one request per changed, quiet, idle group through ``submit``."""

    def __init__(self, data_root: str, submit: Callable[[str], object], is_live: Callable[[str], bool],
                 debounce_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.data_root = os.path.realpath(data_root)
        self._submit, self._is_live, self._clock = submit, is_live, clock
        self.debouncer = Debouncer(debounce_seconds)
        self._stop = threading.Event()
        self._observer = None
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        self._observer = Observer()
        self._observer.schedule(_Marker(self.data_root, self._note), self.data_root, recursive=True)
        self._observer.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="group-watch", daemon=True)
        self._ticker.start()
        log.info("watching %s: a group is queued %.1f s after its files last changed", self.data_root,
                 self.debouncer.quiet_seconds)

    def _note(self, group: str) -> None:
        self.debouncer.note(group, self._clock())

    def flush(self) -> list[str]:
        """Queue every due group now; returns them."""
        queued = []
        for group in self.debouncer.take_due(self._clock(), self._is_live):
            try:
                self._submit(group)
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the watch
                log.warning("%s changed but cannot be queued: %s", group, exc)
                continue
            log.info("%s: files changed; queued", group)
            queued.append(group)
        return queued

    def _tick_loop(self) -> None:
        while not self._stop.wait(min(0.2, self.debouncer.quiet_seconds / 2)):
            self.flush()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        self._stop.set()
        stop_threads(self._observer, self._ticker, timeout_seconds)
        self._observer = self._ticker = None

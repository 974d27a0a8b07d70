"""The queue directory ("spool"): how group requests arrive, are claimed and end.

Layout under the spool root (Maildir-style: write in tmp/, fsync, rename into place, fsync the directory)::

    tmp/       writers create files here (O_EXCL), then link/rename them into incoming/
    incoming/  one file per request: named after its group, or ``<anything>.json``
    active/    one directory per run, ``<run_id>/``, holding the claimed request files
    done/      one JSON record per finished run, ``<run_id>.json``
    failed/    the same for failed runs and refused requests
    state/     daemon state (the estimator's JSON); only created here

Guarantees, and why:

* A claim is an atomic ``rename()`` out of ``incoming/``: of two claimers exactly one
  wins, the other sees ENOENT.
* Requests for a group that is queued or running are coalesced into one run: their
  files join the run's directory, and the run's single record lists every request
  file it closed (``requests``). Every request file therefore ends in exactly one
  record's ``requests`` list, in ``done/`` or ``failed/``.
* A record is durable (fsync of file and directory) before the run's files are
  removed, and is named after the run. :meth:`Spool.recover` finds runs whose record
  exists and only removes their files: records are exactly-once even across a crash.
* Nothing in a request is evaluated. Symlinks are never followed, only removed;
  non-regular, oversized, foreign-owned and malformed requests are refused: each
  refusal is one ``failed/`` record (``reason`` for people, ``reason_class`` one of
  :data:`~throttler.spool.requests.REFUSAL_CLASSES`) and one call of ``on_refused``.

One daemon per spool: the set of running groups lives in memory. File formats
and the crash-safe write live in :mod:`throttler.spool.requests`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from throttler.errors import ThrottlerError
from throttler.spool.files import (
    encode_record,
    listdir,
    read_request,
    remove,
    rmdir,
    safe_name,
    unique_name,
    write_durable,
)
from throttler.spool.requests import (
    DIR_MODE,
    MAX_REQUEST_BYTES,
    RECORD_KINDS,
    BadRequest,
    check_fields,
    check_name,
    is_group,
    parse_request_json,
    validate_group,
)

__all__ = ["BadRequest", "Claim", "Request", "Spool", "validate_group"]

log = logging.getLogger(__name__)

SUBDIRS = ("tmp", "incoming", "active", "done", "failed", "state")
MOVABLE_NAME_BYTES = 240  #: longer (bad) names cannot take a prefix in active/
STALE_TMP_SECONDS = 36 * 3600  #: Maildir's rule: a tmp/ file this old is abandoned


@dataclass(frozen=True)
class Request:
    """One queued request as :meth:`Spool.scan` saw it in ``incoming/``."""

    name: str  #: file name in incoming/
    group: str
    strategy: str | None = None  #: None: the daemon's configured default
    priority: int = 0
    mtime_ns: int = 0
    queued: int = 1  #: request files for this group in the scan (one run closes them all)
    full: bool = False  #: force a full run (no incremental reuse of the previous output)


@dataclass(eq=False)
class Claim:
    """One run of a group: the request files it holds in ``active/<run_id>/``.

    ``files`` grows while the run is open as duplicate requests are coalesced in.
    """

    run_id: str
    group: str | None  #: None only for refused requests naming no valid group
    strategy: str | None
    priority: int | None
    path: Path  #: active/<run_id>
    files: list[tuple[str, str]] = field(default_factory=list)  #: (entry in path, request name)
    is_open: bool = True
    claimed_ns: int = field(default_factory=time.time_ns)
    full: bool = False  #: the first request asked for a full run

    @property
    def requests(self) -> list[str]:
        """Names (printable) of every request file this run closes."""
        return [safe_name(name) for _, name in self.files]

    @property
    def coalesced(self) -> int:
        """How many requests joined after the first one."""
        return max(0, len(self.files) - 1)

    def describe(self, record: dict | None = None) -> dict:
        """This run's record: its own fields, then ``record``'s (which win, e.g. the
        resolved ``strategy``), except ``run``/``requests``/``coalesced``, which
        always describe the run so that every request is closed exactly once."""
        closing = {"run": self.run_id, "requests": self.requests, "coalesced": self.coalesced}
        return {
            "group": self.group, "strategy": self.strategy, "requested_strategy": self.strategy,
            "priority": self.priority, "claimed_unix_seconds": self.claimed_ns / 1e9,
            "finished_unix_seconds": time.time(), **(record or {}), **closing,
        }


class Spool:
    """A spool directory: submit, scan, claim, finish, release and recover requests.

    ``allowed_uids``: owners whose request files are accepted. ``None`` accepts any
    owner, leaving the gate to the directory permissions (only users able to write
    ``incoming/`` can submit); :meth:`default_uids` gives the strict set.

    ``on_refused(reason_class)`` is called once per refused request, after its
    record is durable (the service passes ``Metrics.request_rejected``). It may be
    set after construction; an exception inside it is logged, never raised.

    ``min_rescan_seconds``: a :meth:`scan` within this time of the last full one,
    with no arrival noted since (:meth:`note_arrival`, called by the watcher on
    inotify events and on its periodic tick), returns what that scan found less
    what was claimed since, without listing ``incoming/`` again. A daemon woken
    at every finished group then claims from a backlog of 10,000 requests
    without paying a full listing (tens of ms) per claim. 0 (the default): every
    scan lists the directory.
    """

    def __init__(self, root: str | os.PathLike, allowed_uids=None,
                 on_refused: Callable[[str], None] | None = None, min_rescan_seconds: float = 0.0):
        self.root = Path(root)
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.on_refused = on_refused
        self.min_rescan_seconds = min_rescan_seconds
        self._arrived = threading.Event()  # set: the next scan lists incoming/ again
        self._arrived.set()
        self._scanned_at = float("-inf")  # monotonic time of the last full scan
        self._best: list[Request] = []  # what the last full scan returned
        self._moved: set[str] = set()  # request names moved out of incoming/ since then
        self._lock = threading.Lock()  # guards _runs, _queued, Claim.files/is_open, _finished
        self._runs: dict[str, Claim] = {}  # group -> open run
        self._queued: dict[str, list[Request]] = {}  # group -> requests of the last scan
        self._cache: dict[str, tuple[tuple, Request]] = {}  # name -> (stat key, parsed)
        self._finished: dict[str, int] | None = None  # record counts, loaded lazily

    @staticmethod
    def default_uids() -> frozenset[int]:
        """The strict owner set: root and the daemon's own user."""
        return frozenset({0, os.geteuid()})

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def ensure(self) -> "Spool":
        """Create the layout (mode 0o750, never loosening existing directories)."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for name in SUBDIRS:
            path = self.root / name
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise ThrottlerError(f"spool path {path} is not a directory")
        return self

    # -- durable writes -------------------------------------------------------

    def write_record(self, kind: str, record: dict, name: str | None = None) -> Path:
        """Durably write one JSON record into ``done/`` or ``failed/``; return its path."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"record kind must be one of {RECORD_KINDS}, not {kind!r}")
        if name is None:
            group = record.get("group")
            prefix = group if is_group(group) else "_record"
            name = f"{unique_name(prefix)}.json"
        path = write_durable(self.root / "tmp", self.root / kind, name, encode_record(record))
        with self._lock:
            if self._finished is not None:
                self._finished[kind] += 1
        return path

    def submit(self, group: str, priority: int = 0, strategy: str | None = None, full: bool = False) -> Path:
        """Queue a request for ``group`` durably; raise RequestError if it is malformed.

        Each call writes a distinct ``<group>.<time>.<pid>.<random>.json``, so many
        submits of one group are many requests, which the daemon coalesces.
        """
        check_fields(group, strategy, priority)
        fields = {"group": group, "priority": priority, **({"strategy": strategy} if strategy else {}),
                  **({"full": True} if full else {})}
        data = json.dumps(fields).encode()
        return write_durable(self.root / "tmp", self.root / "incoming", f"{unique_name(group)}.json", data)

    # -- validation -----------------------------------------------------------

    def _inspect(self, path: str | Path, name: str, st: os.stat_result) -> Request:
        """Validate one request file without following links; return what it asks."""
        if stat.S_ISLNK(st.st_mode):
            raise BadRequest("request is a symlink", reason_class="symlink")
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest("request is not a regular file", reason_class="other")
        if self.allowed_uids is not None and st.st_uid not in self.allowed_uids:
            raise BadRequest(f"request owned by uid {st.st_uid}, which is not allowed", reason_class="ownership")
        if st.st_size > MAX_REQUEST_BYTES:
            raise BadRequest("request too large", reason_class="too_large")
        if not check_name(name):
            return Request(name, name, mtime_ns=st.st_mtime_ns)
        group, strategy, priority, full = parse_request_json(read_request(path, st))
        return Request(name, group, strategy, priority, st.st_mtime_ns, full=full)

    def _peek(self, entry: os.DirEntry) -> Request | None:
        """Inspect one entry of ``incoming/`` (cached by its stat); refuse it if bad.

        Plain strings and one lstat per entry: a scan of 10,000 queued requests
        costs tens of milliseconds, and it runs whenever the daemon looks for work.
        """
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid)
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
            request = self._inspect(entry.path, name, st)
        except FileNotFoundError:
            return None
        except BadRequest as err:
            self._refuse(name, err)
            return None
        self._cache[name] = (key, request)
        return request

    def _refuse(self, name: str, err: BadRequest) -> None:
        """Close a bad request: claim it, write its failed record, remove it."""
        log.warning("refused request %r: %s", safe_name(name), err.reason)
        fields = {"request": safe_name(name), "reason": err.reason, "reason_class": err.reason_class}
        if len(os.fsencode(name)) > MOVABLE_NAME_BYTES:  # no room for a prefix: at-least-once
            self.write_record("failed", {**fields, "group": err.group, "requests": [fields["request"]]})
            remove(self.root / "incoming" / name)
            self._report_refusal(err.reason_class)
            return
        run = self._new_run(err.group, None, None, prefix="_refused")
        if self._move_in(run, name):
            self.finish(run, "failed", fields)
            self._report_refusal(err.reason_class)
        else:
            rmdir(run.path)

    def _report_refusal(self, reason_class: str) -> None:
        """Tell ``on_refused`` (metrics); a broken callback never breaks the spool."""
        if self.on_refused is None:
            return
        try:
            self.on_refused(reason_class)
        except Exception:  # noqa: BLE001 - a hook must not fail the intake
            log.warning("on_refused(%r) failed", reason_class, exc_info=True)

    # -- claiming -------------------------------------------------------------

    def scan(self) -> list[Request]:
        """List what to run: one Request per queued group, best first.

        Order: priority descending, then oldest mtime, then name. Each group's
        representative carries the highest priority among its files and ``queued``
        (their count). On the way, bad requests are refused (failed record) and
        requests for a group already running are coalesced into that run. Call it
        from one thread (it keeps a parse cache keyed by each file's stat).

        With ``min_rescan_seconds`` set, a scan soon after the last one may reuse
        its result (see the class docstring).
        """
        started = time.monotonic()
        if not self._arrived.is_set() and started - self._scanned_at < self.min_rescan_seconds:
            with self._lock:
                return [request for request in self._best if request.name not in self._moved]
        self._arrived.clear()  # before listing: an arrival from now on is seen next time
        queued: dict[str, list[Request]] = {}
        present = set()
        with os.scandir(self.root / "incoming") as entries:
            for entry in entries:
                present.add(entry.name)
                request = self._peek(entry)
                if request is not None:
                    queued.setdefault(request.group, []).append(request)
        self._cache = {name: hit for name, hit in self._cache.items() if name in present}
        best = []
        with self._lock:
            self._queued = queued
            for group, requests in queued.items():
                if len(requests) > 1:
                    requests.sort(key=_order)
                run = self._runs.get(group)
                if run is not None:
                    self._absorb(run, requests)
                else:
                    best.append(requests[0] if len(requests) == 1 else replace(requests[0], queued=len(requests)))
            best.sort(key=_order)
            self._best, self._moved, self._scanned_at = best, set(), started
        return list(best)

    def note_arrival(self) -> None:
        """A request may have arrived in ``incoming/``: the next :meth:`scan` lists it again."""
        self._arrived.set()

    def claim(self, request: Request) -> Claim | None:
        """Claim ``request`` (atomic rename into ``active/``) and start its run.

        Returns None when the request is gone (someone else claimed it), when its
        group already runs (the request is coalesced into that run) or when it turns
        out bad on re-inspection (refused with a failed record). Otherwise returns
        the new run, holding also every other queued request of the group.
        """
        with self._lock:
            run = self._runs.get(request.group)
            if run is not None:
                self._absorb(run, [request])
                return None
            run = self._new_run(request.group, request.strategy, request.priority)
            if not self._move_in(run, request.name):
                rmdir(run.path)
                return None
            problem = self._recheck(run)
            if problem is None:
                self._runs[request.group] = run
                self._absorb(run, self._queued.get(request.group, ()))
                return run
        self.finish(run, "failed", {"request": safe_name(request.name), "reason": problem.reason,
                                    "reason_class": problem.reason_class})
        self._report_refusal(problem.reason_class)
        return None

    def _new_run(self, group, strategy, priority, prefix: str | None = None) -> Claim:
        run_id = unique_name(prefix or group)
        path = self.root / "active" / run_id
        os.mkdir(path, DIR_MODE)
        return Claim(run_id, group, strategy, priority, path)

    def _move_in(self, run: Claim, name: str) -> bool:
        """Atomically move ``incoming/<name>`` into the run; False if it is gone."""
        entry = f"{len(run.files)}.{name}"
        try:
            os.rename(self.root / "incoming" / name, run.path / entry)
        except FileNotFoundError:
            return False
        run.files.append((entry, name))
        self._moved.add(name)
        return True

    def _absorb(self, run: Claim, requests) -> None:
        """Coalesce requests into an open run (caller holds the lock)."""
        moved = sum(self._move_in(run, request.name) for request in requests)
        if moved:
            log.info("%d request(s) for %s coalesced into run %s", moved, run.group, run.run_id)

    def _recheck(self, run: Claim) -> BadRequest | None:
        """Re-inspect the claimed file (now out of writers' reach); why it is bad, if it is."""
        entry, name = run.files[0]
        path = run.path / entry
        try:
            found = self._inspect(path, name, os.lstat(path))
        except BadRequest as err:
            return err
        except OSError as err:
            return BadRequest(f"request unreadable: {err.strerror}", run.group, "other")
        if found.group != run.group:
            return BadRequest("request changed while queued", run.group, "other")
        run.strategy, run.priority, run.full = found.strategy, found.priority, found.full
        return None

    def _close(self, claim: Claim) -> tuple[list[tuple[str, str]], bool]:
        """Mark a run closed (no more coalescing); return its files and if it was running."""
        with self._lock:
            if not claim.is_open:
                raise RuntimeError(f"run {claim.run_id} is already closed")
            claim.is_open = False
            was_running = self._runs.get(claim.group) is claim
            if was_running:
                del self._runs[claim.group]
            return list(claim.files), was_running

    def finish(self, claim: Claim, kind: str, record: dict | None = None) -> Path:
        """End a run: durably write ONE record closing all its requests, then remove them.

        ``kind`` is ``done`` or ``failed``; the record is :meth:`Claim.describe`
        (``record`` over the run's fields, with ``run``, ``requests`` = every
        request name closed, ``coalesced``), written as ``<kind>/<run_id>.json``. If
        writing fails the run stays open (still coalescing) and the error
        propagates: retry, or leave it to :meth:`recover` at the next start.
        """
        if kind not in RECORD_KINDS:
            raise ValueError(f"record kind must be one of {RECORD_KINDS}, not {kind!r}")
        files, was_running = self._close(claim)
        try:
            path = self.write_record(kind, claim.describe(record), f"{claim.run_id}.json")
        except FileExistsError:  # a retried finish whose first record did land
            path = self.root / kind / f"{claim.run_id}.json"
        except BaseException:
            with self._lock:
                claim.is_open = True
                if was_running:
                    self._runs.setdefault(claim.group, claim)
            raise
        for entry, _ in files:
            remove(claim.path / entry)
        rmdir(claim.path)
        return path

    def release(self, claim: Claim) -> int:
        """Put an unstarted run's requests back into ``incoming/`` (on shutdown)."""
        files, _ = self._close(claim)
        for entry, name in files:
            self._requeue(claim.path / entry, name)
        rmdir(claim.path)
        return len(files)

    def _requeue(self, path: Path, name: str) -> None:
        """Move a claimed file back to ``incoming/<name>``, not replacing a newer one."""
        dest = self.root / "incoming" / name
        if not os.path.lexists(dest):
            os.rename(path, dest)
            return
        try:
            is_json = check_name(name)
        except BadRequest as err:  # a refused request taken by a crash: close it here
            request = safe_name(name)
            self.write_record("failed", {"request": request, "reason": err.reason,
                                         "reason_class": err.reason_class, "requests": [request]})
            remove(path)
            self._report_refusal(err.reason_class)
            return
        if is_json:  # same content under a fresh name
            os.rename(path, dest.with_name(f"{unique_name(name[:-5][:150])}.json"))
        else:  # a plain name carries only its group
            self.submit(name)
            remove(path)

    def recover(self) -> dict[str, int]:
        """At start: settle what a crash left in ``active/`` and stale ``tmp/`` files.

        A run whose record exists already ended: its files are removed. Any other
        run's files go back to ``incoming/`` to run again. Returns counts
        ``{"requeued": files, "closed": runs}``.
        """
        summary = {"requeued": 0, "closed": 0}
        for run_id in sorted(listdir(self.root / "active")):
            run_dir = self.root / "active" / run_id
            if not stat.S_ISDIR(os.lstat(run_dir).st_mode):
                self._requeue(run_dir, run_id)
                summary["requeued"] += 1
                continue
            recorded = any(os.path.lexists(self.root / kind / f"{run_id}.json") for kind in RECORD_KINDS)
            for entry in listdir(run_dir):
                if recorded:
                    remove(run_dir / entry)
                else:
                    self._requeue(run_dir / entry, entry.split(".", 1)[-1])
                    summary["requeued"] += 1
            rmdir(run_dir)
            summary["closed"] += recorded
        self._clean_tmp()
        log.info("spool recovered: %s", summary)
        return summary

    def _clean_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for name in listdir(self.root / "tmp"):
            path = self.root / "tmp" / name
            try:
                if os.lstat(path).st_mtime < cutoff:
                    remove(path)
            except FileNotFoundError:
                pass

    def counts(self) -> dict[str, int]:
        """Depths: ``incoming`` request files, ``active`` runs, ``done``/``failed`` records.

        Record counts are listed once, then kept by :meth:`write_record` (the
        daemon is their only writer), so this stays cheap with many records. A
        missing directory counts 0 (a spool not yet created is empty).
        """
        with self._lock:
            if self._finished is None:
                self._finished = {kind: _depth(self.root / kind) for kind in RECORD_KINDS}
            finished = dict(self._finished)
        queued = {name: _depth(self.root / name) for name in ("incoming", "active")}
        return {**queued, **finished}


def _depth(path: Path) -> int:
    try:
        return len(listdir(path))
    except FileNotFoundError:
        return 0


def _order(request: Request) -> tuple:
    return (-request.priority, request.mtime_ns, request.name)




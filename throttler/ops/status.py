"""What the daemon shows of itself: cluster view, metrics, the status file.

The main loop calls :meth:`StatusReporter.refresh` every iteration; it reads a
fresh scheduler snapshot at most once a second (submitters also feed it theirs),
publishes gauges, counts lost workers, and writes ``state/status.json``
atomically for ``throttler status``. While the daemon drains, the drain calls it
instead (without reading the scheduler), so the file stays fresh, the daemon is
still seen alive, and the file's ``draining`` field says how much is left.

Each worker that joins is checked once, off the main loop, for the daemon's
version of dask-throttler
(:func:`throttler.cluster.workers.package_problem`) and for access to the data
root and the output directory with the worker's own mount, endpoint and
credentials (:func:`throttler.cluster.workers.data_root_problem`,
:func:`~throttler.cluster.workers.output_problem`); a problem is logged as an
error, counted in a gauge and listed in the status file. A worker that cannot
reach the data or the output is also withdrawn from our tasks
(:func:`throttler.cluster.worker_memory.set_withdrawn`) and left out of what
admission and planning count, so the groups run on the others instead of
failing there attempt after attempt; it is checked again every
``worker_recheck_seconds`` and given back once it can. The check of a worker
starts as soon as a snapshot shows it, and admission counts the worker only once
its first check is done (:meth:`StatusReporter.admissible`, waiting at most
``FIRST_CHECK_WAIT_SECONDS``): ``throttler run``'s groups, submitted at once,
would otherwise reach a worker before anyone knew it cannot see the output.
Workers left out are *withheld* in the snapshot admission reads (not running,
still there), so a group that only a withheld worker could hold waits for it
instead of being failed as one that can never fit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from throttler import __version__
from throttler.admission.policy import Budget, Tally
from throttler.cluster.scheduler import read_snapshot
from throttler.cluster.snapshot import ClusterShape, ClusterSnapshot
from throttler.cluster.worker_memory import set_withdrawn
from throttler.cluster.workers import (
    data_root_problem,
    data_root_reports,
    output_marker,
    output_problem,
    output_reports,
    package_problem,
    worker_package_reports,
)
from throttler.durable import write_json_atomic
from throttler.ops.liveness import own_start_ticks

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
PACKAGE_CHECK_RETRY_SECONDS = 30.0  #: after a package check that could not run at all
#: admission leaves out a worker whose first check has not finished for at most this long after it
#: was first seen (a check that hangs or cannot run does not hold the groups back for longer)
FIRST_CHECK_WAIT_SECONDS = 10.0
KNOWN_STATUSES = ("running", "paused", "closing")


class StatusReporter:
    def __init__(self, service):
        self.service = service
        self._lock = threading.Lock()
        self._snapshot: ClusterSnapshot | None = None
        self._refreshed_at = 0.0
        self._addresses: set[str] = set()
        self.workers_lost = 0
        self._checked: set[str] = set()  #: workers whose packages were checked
        self._ready: set[str] = set()  #: workers whose first check has finished (admission counts them)
        self._first_seen: dict[str, float] = {}  #: address -> when a snapshot first showed it
        self._check_start_lock = threading.Lock()
        self.worker_problems: dict[str, str] = {}  #: address -> why it cannot run our tasks
        #: address -> why it cannot read the data root or write the output (withdrawn from our tasks)
        self.data_problems: dict[str, str] = {}
        self._recheck_at = 0.0  #: when workers with data problems are checked again
        self._check_thread: threading.Thread | None = None
        self._check_after = 0.0
        self._start_ticks = own_start_ticks()

    @property
    def last_threads(self) -> int:
        snap = self._snapshot
        return snap.total_threads if snap else 0

    def shape(self) -> ClusterShape:
        """The cluster shape to plan for (reads the scheduler if nothing is known yet)."""
        if self._snapshot is None or not self._snapshot.workers:
            self.observe_snapshot(read_snapshot(self.service.client))
        return self.usable(self._snapshot).shape()

    def usable(self, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """``snapshot`` without the workers withdrawn from our tasks (what planning and the status count)."""
        with self._lock:
            withdrawn = list(self.data_problems)
        return snapshot.without(withdrawn)

    def admissible(self, snapshot: ClusterSnapshot, now: float | None = None) -> ClusterSnapshot:
        """:meth:`usable`, also without the workers whose first check is still running (for at most
        ``FIRST_CHECK_WAIT_SECONDS``): admission waits for it rather than send a group to a worker
        that may not see the output (seen: ``throttler run``'s first group failed an attempt there)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            held = list(self.data_problems) + [a for a, seen in self._first_seen.items()
                                               if a not in self._ready and now - seen < FIRST_CHECK_WAIT_SECONDS]
        return snapshot.without(held)

    def observe_snapshot(self, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """Keep the newest snapshot, count workers that vanished since the last one and start the check
        of those that joined. Returns ``snapshot`` as admission may use it (:meth:`admissible`)."""
        now = time.monotonic()
        with self._lock:
            stale = self._snapshot is not None and snapshot.taken_at_seconds < self._snapshot.taken_at_seconds
        if stale:  # a newer one is kept; this one is still what its reader admits with
            return self.admissible(snapshot, now)
        with self._lock:
            current = {w.address for w in snapshot.workers}
            lost, joined = self._addresses - current, current - self._addresses
            self._addresses = current
            self._snapshot = snapshot
            self._checked -= lost  # a worker back at the same address is checked again
            self._ready -= lost
            for address in lost:
                self.worker_problems.pop(address, None)
                self.data_problems.pop(address, None)
                self._first_seen.pop(address, None)
            for address in joined:
                self._first_seen[address] = now
        for address in lost:
            self.workers_lost += 1
            log.warning("worker %s left the cluster", address)
            self.service.metrics.worker_lost()
        if joined:
            self._check_new_workers(now)  # now, not at the next refresh: admission waits for it
        return self.admissible(snapshot, now)

    def refresh(self, force: bool = False, read_scheduler: bool = True) -> None:
        """Publish gauges and rewrite the status file, at most once a second unless ``force``.

        With ``read_scheduler`` (the main loop) a fresh snapshot is read and new
        workers are checked first; without (the drain) the last snapshot is shown.
        """
        now = time.monotonic()
        if not force and now - self._refreshed_at < REFRESH_SECONDS:
            return
        self._refreshed_at = now
        if read_scheduler:
            self._read_scheduler(now)
        self._publish()

    def _read_scheduler(self, now: float) -> None:
        try:
            self.observe_snapshot(read_snapshot(self.service.client))
        except Exception as exc:  # noqa: BLE001 - the scheduler may be away for a while
            log.warning("cannot read the scheduler: %s", exc)
        self._check_new_workers(now)

    def _check_new_workers(self, now: float) -> None:
        """Check workers not checked yet, or withdrawn ones again when due, in a thread (one check at a time)."""
        with self._check_start_lock:  # the main loop and the submitters' snapshots both start checks
            with self._lock:
                new = sorted(self._addresses - self._checked)
                withdrawn = sorted(self.data_problems)
            busy = self._check_thread is not None and self._check_thread.is_alive()
            if busy or now < self._check_after:
                return
            if new:
                target, args = self.check_workers, (new,)
            elif withdrawn and now >= self._recheck_at:
                target, args = self.check_data_access, (withdrawn,)
            else:
                return
            self._check_thread = threading.Thread(target=target, args=args, name="worker-check", daemon=True)
            self._check_thread.start()

    def wait_for_checks(self, timeout_seconds: float) -> None:
        """Wait until the worker check now running (if any) has finished."""
        thread = self._check_thread
        if thread is not None:
            thread.join(timeout_seconds)

    def check_workers(self, addresses: list[str]) -> None:
        """Check ``addresses``' packages, then their access to the data and the output; admission
        counts them once this is done (:meth:`admissible`), whatever it found or failed to find."""
        try:
            self._check_packages_and_access(addresses)
        finally:
            with self._lock:
                self._ready.update(a for a in addresses if a in self._addresses)

    def _check_packages_and_access(self, addresses: list[str]) -> None:
        try:
            reports = worker_package_reports(self.service.client, addresses)
        except Exception as exc:  # noqa: BLE001 - try again later; tasks still run
            self._check_after = time.monotonic() + PACKAGE_CHECK_RETRY_SECONDS
            log.warning("cannot check the workers' packages: %s", exc)
            return
        for address, report in sorted(reports.items()):
            problem = package_problem(__version__, report)
            with self._lock:
                if address not in self._addresses:
                    continue  # left meanwhile
                self._checked.add(address)
                if problem:
                    self.worker_problems[address] = problem
            if problem:
                log.error("worker %s cannot run this daemon's tasks as expected: %s", address, problem)
        incompatible = self.incompatible_workers()
        self.check_data_access([a for a in addresses if a not in incompatible], joined=True)

    def check_data_access(self, addresses: list[str], joined: bool = False) -> None:
        """Probe the data root and the output directory from ``addresses`` (workers with the right
        package); withdraw those that fail from our tasks, give back those that pass again.

        ``joined``: the workers' first check by this daemon, which sets their state whatever it
        was: a daemon before this one (or a test's) may have withdrawn a worker that can now.
        """
        config = self.service.config
        if not addresses:
            return
        self._recheck_at = time.monotonic() + config.worker_recheck_seconds
        try:
            problems = self._access_problems(addresses, str(config.data_root), str(config.output))
        except Exception as exc:  # noqa: BLE001 - the package check ran; tasks will say the rest
            log.warning("cannot check the workers' access to the data and the output: %s", exc)
            return
        to_set: dict[str | None, list[str]] = {}  #: the withdrawal reason (None: given back) -> workers
        for address in sorted(addresses):
            if self._settle_access(address, problems.get(address), joined):
                to_set.setdefault(problems.get(address), []).append(address)
        for reason, workers in to_set.items():  # one round trip for every worker given back, say
            try:
                set_withdrawn(self.service.client, workers, reason)
            except Exception as exc:  # noqa: BLE001 - admission leaves them out all the same
                log.warning("cannot %s workers %s: %s", "withdraw" if reason else "give back", workers, exc)

    def _access_problems(self, addresses: list[str], data_root: str, output_root: str) -> dict[str, str]:
        """address -> what it cannot reach ("; "-joined), for the workers of ``addresses`` that cannot."""
        client = self.service.client
        data = data_root_reports(client, addresses, data_root)
        with output_marker(output_root) as marker:
            output = output_reports(client, addresses, output_root, marker)
        problems = {}
        for address in addresses:
            found = [p for p in (data_root_problem(data_root, data.get(address, {"error": None})),
                                 output_problem(output_root, output.get(address, {"error": None}))) if p]
            if found:
                problems[address] = "; ".join(found)
        return problems

    def _settle_access(self, address: str, problem: str | None, joined: bool) -> bool:
        """Record ``address``'s check; True when the worker's withdrawal must be set (to ``problem``)."""
        with self._lock:
            if address not in self._addresses:
                return False  # left meanwhile
            before = self.data_problems.get(address)
            if problem:
                self.data_problems[address] = problem
            else:
                self.data_problems.pop(address, None)
        changed = bool(problem) != bool(before)  # else: withdrawn still (its reason may read otherwise), or able
        if problem and changed:
            log.error("worker %s %s; it is given none of our tasks until it can", address, problem)
        elif changed:
            log.warning("worker %s can now reach the data root and the output directory; it is given our tasks "
                        "again", address)
        return changed or joined

    def workers_without_data_access(self) -> dict[str, str]:
        with self._lock:
            return dict(self.data_problems)

    def incompatible_workers(self) -> dict[str, str]:
        with self._lock:  # the check thread adds to it
            return dict(self.worker_problems)

    def cluster_memory(self) -> dict:
        """Capacity, used and free as admission sees them (see admission.decide)."""
        snap, svc = self._snapshot, self.service
        if snap is None:
            return {"limit_bytes": 0, "used_bytes": 0, "free_bytes": 0, "reserved_bytes": 0}
        budget = Budget.of(self.usable(snap), svc.config.memory_fraction)
        used = budget.used_bytes(Tally.of(svc.ledger.items()))
        return {"limit_bytes": budget.capacity_bytes, "used_bytes": used,
                "free_bytes": budget.capacity_bytes - used, "reserved_bytes": svc.ledger.total_bytes()}

    def workers_without_memory_limit(self) -> list[str]:
        """Running workers with no memory limit: the daemon sized them from an assumed one (docs/memory.md)."""
        running = self._snapshot.running_workers if self._snapshot else ()
        return sorted(w.address for w in running if not w.memory_limit_bytes)

    def workers_host_capped(self) -> dict[str, dict]:
        """Running workers sized to their share of a machine their limits overcommit (docs/memory.md)."""
        running = self._snapshot.running_workers if self._snapshot else ()
        return {w.address: {"memory_limit_bytes": w.memory_limit_bytes, "sized_limit_bytes": w.budget_limit_bytes}
                for w in running if w.budget_limit_bytes < w.memory_limit_bytes}

    def workers_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(KNOWN_STATUSES + ("other",), 0)
        for w in (self._snapshot.workers if self._snapshot else ()):
            counts[w.status if w.status in KNOWN_STATUSES else "other"] += 1
        return counts

    def document(self) -> dict:
        svc = self.service
        return {
            "pid": os.getpid(),
            "pid_start_ticks": self._start_ticks,
            "updated_unix_seconds": time.time(),
            "states": svc.state_counts(),
            "draining": svc.draining(),  # None while serving
            "queue": svc.spool.counts(),
            "running": svc.running_groups(),
            "cluster_memory": self.cluster_memory(),
            "workers": self.workers_by_status(),
            "workers_lost": self.workers_lost,
            "workers_incompatible": self.incompatible_workers(),
            "workers_without_memory_limit": self.workers_without_memory_limit(),
            "workers_host_capped": self.workers_host_capped(),
            "workers_without_data_access": self.workers_without_data_access(),
            "pools": {k: {"busy": b, "size": s} for k, (b, s) in svc.busy().items()},
            "estimator": svc.estimator.accuracy(),
        }

    def _publish(self) -> None:
        svc, metrics = self.service, self.service.metrics
        doc = self.document()
        memory = doc["cluster_memory"]
        metrics.set_group_states(doc["states"])
        metrics.set_queue_depth(doc["queue"]["incoming"], doc["queue"]["active"])
        metrics.set_reserved_bytes(memory["reserved_bytes"])
        metrics.set_cluster_memory(memory["limit_bytes"], memory["used_bytes"], memory["free_bytes"])
        metrics.set_workers(doc["workers"])
        metrics.set_workers_incompatible(len(doc["workers_incompatible"]))
        metrics.set_workers_without_memory_limit(len(doc["workers_without_memory_limit"]))
        metrics.set_workers_host_capped(len(doc["workers_host_capped"]))
        metrics.set_workers_without_data_access(len(doc["workers_without_data_access"]))
        for pool, figures in doc["pools"].items():
            metrics.set_pool(pool, figures["busy"], figures["size"])
        try:
            write_json_atomic(str(svc.spool.state_dir / "status.json"), doc)
        except OSError as exc:
            log.warning("cannot write status file: %s", exc)

    def summary_line(self) -> str:
        """One line for systemd's STATUS=."""
        states = self.service.state_counts()
        memory = self.cluster_memory()
        return (f"queued {states['queued'] + states['planning']}, waiting {states['waiting']}, "
                f"running {states['running']}; reserved {memory['reserved_bytes'] / 2**30:.1f} GiB "
                f"of {memory['limit_bytes'] / 2**30:.1f} GiB")


class StartingStatus:
    """The status file while ``serve`` starts, before its service exists (a context manager).

    Connecting to a scheduler that is not up yet can take minutes; without this,
    ``throttler status`` would show whatever the previous daemon left (a dead
    pid) while this one waits. The file names this process and what it waits
    for, and a thread rewrites it every :data:`REFRESH_SECONDS` so it stays
    fresh; the service's own status replaces it once the daemon serves.
    """

    def __init__(self, state_dir, waiting_for: str):
        self.path = os.path.join(state_dir, "status.json")
        self.waiting_for = waiting_for
        self.since_unix_seconds = time.time()
        self._start_ticks = own_start_ticks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._rewrite, name="starting-status", daemon=True)

    def document(self) -> dict:
        return {"pid": os.getpid(), "pid_start_ticks": self._start_ticks, "updated_unix_seconds": time.time(),
                "starting": {"waiting_for": self.waiting_for, "since_unix_seconds": self.since_unix_seconds}}

    def __enter__(self) -> "StartingStatus":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _rewrite(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self._write()

    def _write(self) -> None:
        try:
            write_json_atomic(self.path, self.document())
        except OSError as exc:
            log.warning("cannot write status file: %s", exc)


def read_status(state_dir) -> dict | None:
    try:
        with open(os.path.join(state_dir, "status.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None

"""Reading the scheduler: what each worker has and holds, as plain values.

:func:`read_snapshot` asks the scheduler for its ``WorkerState`` objects
directly (``client.run_on_scheduler``, about 0.7 ms): their managed memory is
updated on every task completion, fresher than the heartbeat figures of
``client.scheduler_info()``; process memory still comes with heartbeats
(every 0.5-2 s). Admission policy (:mod:`throttler.admission`) and the
planner (:mod:`throttler.planner`) only ever see the values defined here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

log = logging.getLogger(__name__)

#: The worker resource that admission restrictions are expressed in (bytes).
MEMORY_RESOURCE = "MEMORY"

#: Statuses of workers that belong to the cluster's shape (a paused worker
#: comes back; a closing one does not).
SHAPE_STATUSES = ("running", "paused")

#: What a worker process holds before any task of ours: the interpreter,
#: distributed, numpy, pandas and pyarrow imported measured 132 MiB RSS (a
#: fresh worker 61 MiB before the first task imports pandas). A task's budget
#: leaves it out: on a 477 MiB worker, a task of 0.6 x the limit plus this
#: baseline would reach the pause threshold (0.8).
WORKER_BASELINE_BYTES = 144 * 2**20

#: Share of the machine's memory the embedded cluster's workers may use together.
EMBEDDED_MEMORY_SHARE = 0.8

#: The MEMORY resource a worker should declare, as a share of its memory limit:
#: Dask's spill threshold. Running tasks' restrictions then add up to at most
#: 70% of the limit, below pause (80%) and terminate (95%) with the worker's
#: own memory on top. Declaring the whole limit let tasks fill it and get the
#: worker killed (seen in the simulation at 64 workers with groupby).
MEMORY_RESOURCE_SHARE = 0.7


@dataclass(frozen=True)
class WorkerView:
    """One worker as the scheduler saw it."""

    name: str
    address: str
    status: str  #: the Status name: "running", "paused", "closing", ...
    nthreads: int
    memory_limit_bytes: int  #: 0 when the worker has no limit
    process_bytes: int  #: RSS from the last heartbeat
    managed_bytes: int  #: bytes of task results in memory (updated per task)
    unmanaged_old_bytes: int  #: process memory neither managed nor recent
    memory_resource: float | None = None  #: the declared MEMORY resource, if any
    used_memory_resource: float = 0.0  #: MEMORY held by running tasks
    processing: int = 0  #: tasks assigned to the worker and not finished (fresh: per task)

    @property
    def is_running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class ClusterShape:
    """The cluster as the planner sizes a group for it."""

    n_workers: int
    memory_limit_bytes: tuple[int, ...]  #: per worker
    nthreads: tuple[int, ...]  #: per worker
    has_memory_resource: bool = False  #: every worker declares MEMORY

    def __post_init__(self):
        if not (self.n_workers == len(self.memory_limit_bytes) == len(self.nthreads)):
            raise ValueError(f"ClusterShape: {self.n_workers} workers but "
                             f"{len(self.memory_limit_bytes)} limits and {len(self.nthreads)} thread counts")

    @classmethod
    def uniform(cls, n_workers: int, memory_limit_bytes: int, nthreads: int = 1,
                has_memory_resource: bool = True) -> "ClusterShape":
        """``n_workers`` identical workers."""
        return cls(n_workers, (memory_limit_bytes,) * n_workers, (nthreads,) * n_workers,
                   has_memory_resource)

    @property
    def total_threads(self) -> int:
        return sum(self.nthreads)

    @property
    def largest_memory_limit_bytes(self) -> int:
        return max(self.memory_limit_bytes, default=0)

    def concurrent_tasks(self, task_peak_bytes: int) -> int:
        """How many tasks of one plan can run at once.

        Each thread runs one task. With the MEMORY resource, every task of a
        plan asks for its task peak, so a worker also runs at most
        ``memory_limit // task_peak`` of them (assuming workers declare MEMORY
        equal to their memory_limit, as :func:`start_embedded_cluster` does;
        a smaller declaration only lowers the real figure).
        """
        if not self.has_memory_resource or task_peak_bytes <= 0:
            return max(1, self.total_threads)
        slots = sum(min(threads, limit // task_peak_bytes)
                    for threads, limit in zip(self.nthreads, self.memory_limit_bytes))
        return max(1, slots)

    def task_budget_bytes(self, memory_fraction: float) -> int:
        """What one task may hold: the largest worker's limit x the fraction, less its baseline."""
        return worker_budget_bytes(self.largest_memory_limit_bytes, memory_fraction)

    def cluster_budget_bytes(self, memory_fraction: float) -> int:
        """What one group may hold: every worker's budget together."""
        return sum(worker_budget_bytes(limit, memory_fraction) for limit in self.memory_limit_bytes)


def worker_budget_bytes(memory_limit_bytes: int, memory_fraction: float) -> int:
    """What our tasks may hold on one worker: limit x fraction, less the worker's own baseline."""
    return max(0, int(memory_limit_bytes * memory_fraction) - WORKER_BASELINE_BYTES)


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every worker at one instant (``taken_at_seconds`` is ``time.monotonic()``)."""

    workers: tuple[WorkerView, ...]
    taken_at_seconds: float

    @property
    def running_workers(self) -> tuple[WorkerView, ...]:
        return tuple(w for w in self.workers if w.is_running)

    @property
    def process_bytes(self) -> int:
        """Process memory of the running workers."""
        return sum(w.process_bytes for w in self.running_workers)

    @property
    def total_threads(self) -> int:
        """Threads of the running workers."""
        return sum(w.nthreads for w in self.running_workers)

    def shape(self) -> ClusterShape:
        """The planning shape: running and paused workers (closing ones are gone)."""
        members = [w for w in self.workers if w.status in SHAPE_STATUSES]
        return ClusterShape(
            n_workers=len(members),
            memory_limit_bytes=tuple(w.memory_limit_bytes for w in members),
            nthreads=tuple(w.nthreads for w in members),
            has_memory_resource=bool(members) and all(w.memory_resource is not None for w in members),
        )


def memory_restriction(task_peak_bytes: int, snapshot: ClusterSnapshot) -> dict | None:
    """The per-task ``resources`` to submit with, or None when no running worker
    declares MEMORY (then a restriction would leave tasks waiting forever).

    Never more than the largest declaration, so every task can run somewhere.
    """
    declared = [w.memory_resource for w in snapshot.running_workers if w.memory_resource]
    if not declared:
        return None
    return {MEMORY_RESOURCE: min(float(task_peak_bytes), max(declared))}


def read_snapshot(client: Any, clock: Callable[[], float] = time.monotonic) -> ClusterSnapshot:
    """Read every worker's state from the scheduler (one round trip)."""
    records = client.run_on_scheduler(_scheduler_worker_records())
    workers = tuple(WorkerView(**r) for r in sorted(records, key=lambda r: r["name"]))
    return ClusterSnapshot(workers=workers, taken_at_seconds=clock())


def _scheduler_worker_records() -> Callable:
    """The function run on the scheduler.

    It is defined inside this function so cloudpickle ships it by value: a
    remote scheduler need not have throttler installed. It uses no globals
    and returns plain dicts.
    """

    def collect(dask_scheduler) -> list[dict]:
        records = []
        for ws in dask_scheduler.workers.values():
            try:
                mem = ws.memory
                process, managed, old = int(mem.process), int(mem.managed), int(mem.unmanaged_old)
            except (KeyError, TypeError, AttributeError):  # no heartbeat metrics yet
                process = managed = old = 0
            declared = (ws.resources or {}).get("MEMORY")
            records.append(dict(
                name=str(ws.name), address=ws.address,
                status=getattr(ws.status, "name", str(ws.status)),
                nthreads=int(ws.nthreads), memory_limit_bytes=int(ws.memory_limit or 0),
                process_bytes=process, managed_bytes=managed, unmanaged_old_bytes=old,
                memory_resource=None if declared is None else float(declared),
                used_memory_resource=float((ws.used_resources or {}).get("MEMORY", 0.0)),
                processing=len(ws.processing),
            ))
        return records

    return collect


#: The distribution workers must have installed, at the daemon's version: they
#: unpickle tasks that call ``throttler.kernels``.
DISTRIBUTION = "dask-throttler"


def worker_package_probe() -> Callable:
    """The function run on each worker: ``{"version", "error"}`` of its dask-throttler.

    Shipped by value (defined inside this function) so that it runs even on a
    worker without throttler. It imports ``throttler.kernels`` there, which
    also takes that import out of the first task the worker runs.
    """

    def probe() -> dict:
        from importlib import import_module, metadata

        try:
            version = metadata.version("dask-throttler")
        except metadata.PackageNotFoundError:
            return {"version": None, "error": None}
        try:
            import_module("throttler.kernels")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"version": version, "error": f"{type(exc).__name__}: {exc}"}
        return {"version": version, "error": None}

    return probe


def worker_package_reports(client: Any, addresses) -> dict[str, object]:
    """Run the probe on ``addresses``: a report dict per worker, or the exception it raised."""
    return client.run(worker_package_probe(), workers=list(addresses), on_error="return")


def package_problem(expected_version: str, report: object) -> str | None:
    """Why a worker cannot run this daemon's tasks as expected, or None when it can."""
    if isinstance(report, BaseException):
        return f"the package check failed there: {type(report).__name__}: {report}"
    if not isinstance(report, dict):
        return f"the package check returned {report!r}"
    version, error = report.get("version"), report.get("error")
    if version is None:
        return f"{DISTRIBUTION} is not installed there; tasks will fail to unpickle"
    if error:
        return f"{DISTRIBUTION} {version} is installed but importing throttler.kernels fails: {error}"
    if version != expected_version:
        return f"{DISTRIBUTION} {version} is installed there; this daemon runs {expected_version}"
    return None


def default_worker_layout(n_workers: int | None = None, threads_per_worker: int | None = None,
                          memory_limit_bytes: int | None = None) -> tuple[int, int, int]:
    """(workers, threads each, memory limit each) sized to this machine.

    One single-threaded worker per core; together they get 80% of the memory.
    """
    n = n_workers or psutil.cpu_count(logical=True) or 1
    threads = threads_per_worker or 1
    limit = memory_limit_bytes or int(psutil.virtual_memory().total * EMBEDDED_MEMORY_SHARE / n)
    return n, threads, limit


def start_embedded_cluster(memory_limit_bytes: int | None = None, n_workers: int | None = None,
                           threads_per_worker: int | None = None):
    """Start a LocalCluster of worker processes declaring MEMORY; returns (cluster, client)."""
    from distributed import Client, LocalCluster

    n, threads, limit = default_worker_layout(n_workers, threads_per_worker, memory_limit_bytes)
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=threads, processes=True, memory_limit=limit,
        resources={MEMORY_RESOURCE: int(limit * MEMORY_RESOURCE_SHARE)}, dashboard_address=None, silence_logs=logging.WARNING,
    )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    log.info("embedded cluster: %d workers x %d threads, %.1f GiB each", n, threads, limit / 2**30)
    return cluster, client

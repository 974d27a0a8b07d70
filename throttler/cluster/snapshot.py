"""Reading the scheduler: what each worker has and holds, as plain values.

:func:`read_snapshot` asks the scheduler for its ``WorkerState`` objects
directly (``client.run_on_scheduler``, about 0.7 ms): their managed memory is
updated on every task completion, fresher than the heartbeat figures of
``client.scheduler_info()``; process memory still comes with heartbeats
(every 0.5-2 s). Admission policy (:mod:`throttler.admission.policy`) and the
planner (:mod:`throttler.planning.planner`) only ever see the values defined here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


#: Statuses of workers that belong to the cluster's shape (a paused worker
#: comes back; a closing one does not).
SHAPE_STATUSES = ("running", "paused")

#: What a worker process holds before any task of ours: the interpreter,
#: distributed, numpy, pandas and pyarrow imported measured 132 MiB RSS (a
#: fresh worker 61 MiB before the first task imports pandas). A task's budget
#: leaves it out: on a 477 MiB worker, a task of 0.6 x the limit plus this
#: baseline would reach the pause threshold (0.8).
WORKER_BASELINE_BYTES = 144 * 2**20


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
        ``MEMORY // task_peak`` of them. The shape does not know the declared
        MEMORY, so this counts ``memory_limit // task_peak``: an upper bound.
        The embedded cluster declares 0.7 x the limit
        (:data:`~throttler.cluster.embedded.MEMORY_RESOURCE_SHARE`), where the
        real figure can be lower; counting more tasks at once only makes the
        group's reserved peak larger, never smaller (safe for admission).
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




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
import sys
from dataclasses import dataclass, replace

from throttler.config import DEFAULTS

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

#: What a worker holds above that baseline once numba is loaded (by a ``dense``
#: task: its compiled loops and the fast page checks), for the process's life,
#: when the loops come from numba's cache on disk: measured 100 MiB of RSS after
#: importing the page checks (68 MiB of it LLVM's library pages), 106-109 MiB
#: after a first dense leaf and a final of every key type, trimmed. The worker
#: reports it (:func:`resident_code_bytes`); its memory plugin takes it out of the
#: worker's budgets and admission counts it as the worker's own, like the baseline.
NUMBA_RESIDENT_BYTES = 112 * 2**20

#: The same when this process compiled the loops itself (a fresh installation whose
#: cache is not written yet, or a cache directory the worker cannot write): LLVM keeps
#: more. Measured 116 MiB after importing the page checks, 138-143 MiB after a dense
#: leaf and a final of every key type. Told apart by the dispatchers' cache misses.
NUMBA_COMPILED_BYTES = 144 * 2**20

#: Below Dask's pause threshold, for one task alone: RSS read between two
#: heartbeats and allocator pages the model does not see (docs/memory.md).
SOLO_MARGIN = 0.05

#: The smallest worker limit at which the daemon's package probe loads numba when
#: the worker joins (2.81 GiB): its code, even compiled there, is then at most the
#: solo margin, so the second before the worker is sized again without it stays
#: within that margin.
NUMBA_PRELOAD_MIN_LIMIT_BYTES = int(NUMBA_COMPILED_BYTES / SOLO_MARGIN)

#: The worker metric (in its heartbeats) that reports :func:`resident_code_bytes`.
RESIDENT_CODE_METRIC = "throttler_resident_code_bytes"

#: The status :meth:`ClusterSnapshot.without` gives a worker the daemon withholds from its tasks (it
#: could not reach the data or the output, or its first check is not done yet).
WITHHELD = "withheld"

#: Dask's default pause threshold, used when the worker's is disabled.
DEFAULT_PAUSE_FRACTION = 0.8


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
    memory_budget_bytes: int = 0  #: the daemon's throttler-memory-bytes resource (0: not sized yet)
    solo_budget_bytes: int = 0  #: the daemon's throttler-solo-bytes resource (0: not sized yet)
    used_budget_bytes: float = 0.0  #: throttler-memory-bytes held by our running tasks
    processing: int = 0  #: tasks assigned to the worker and not finished (fresh: per task)
    sized_limit_bytes: int = 0  #: the limit the worker plugin sized it from (0: not sized yet)
    resident_code_bytes: int = 0  #: code loaded past the import baseline (numba), as its heartbeat said

    @property
    def is_running(self) -> bool:
        return self.status == "running"

    @property
    def budget_limit_bytes(self) -> int:
        """The limit admission counts: Dask's, capped to the share the worker plugin sized it from
        on a machine whose workers' limits overcommit it (:mod:`throttler.cluster.memory_domain`).
        A worker without a limit counts 0, as before any sizing."""
        if not self.memory_limit_bytes:
            return 0
        return min(self.sized_limit_bytes or self.memory_limit_bytes, self.memory_limit_bytes)

    def shared_budget(self, memory_fraction: float) -> int:
        """What our tasks running at once here may hold (as the worker plugin sized it)."""
        return self.memory_budget_bytes or worker_budget_bytes(self.memory_limit_bytes, memory_fraction)

    def solo_budget(self) -> int:
        """What one task of ours alone here may hold."""
        return self.solo_budget_bytes or solo_budget_bytes(self.memory_limit_bytes)


def resident_code_bytes(worker=None) -> int:
    """A worker metric: the memory this process holds past the import baseline for code it loaded
    (numba), which admission counts as the worker's own (registered by the worker memory plugin)."""
    if "numba" not in sys.modules:
        return 0
    return NUMBA_COMPILED_BYTES if numba_compiled_here() else NUMBA_RESIDENT_BYTES


_compiled_here = False


def numba_compiled_here() -> bool:
    """Whether one of throttler's compiled functions was compiled in this process (its on-disk cache
    missed) rather than loaded: once true, true for the process's life.

    Called from the worker's event loop (heartbeats, the sizing check) while a task's thread
    may be importing numba: it imports nothing, skips modules still being imported (seen
    again a second later), and answers True, not remembered, if anything goes wrong.
    """
    global _compiled_here
    if not _compiled_here:
        try:
            _compiled_here = any(_cache_missed(module) for name, module in list(sys.modules.items())
                                 if name.startswith("throttler.worker.") and _imported(module))
        except Exception:  # noqa: BLE001 - a dispatcher changing under us: the larger figure, this time
            return True
    return _compiled_here


def _imported(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _cache_missed(module) -> bool:
    """A numba dispatcher of ``module`` compiled a signature its cache did not have (numba not imported)."""
    return any(type(value).__name__ == "CPUDispatcher" and sum(value.stats.cache_misses.values())
               for value in list(vars(module).values()))


@dataclass(frozen=True)
class ClusterShape:
    """The cluster as the planner sizes a group for it.

    Per worker: its memory limit, threads, and the two budgets the daemon's
    worker plugin gave it (:mod:`throttler.cluster.worker_memory`): what our
    tasks running at once may hold together, and what one task running alone
    may hold. Budgets not known (``()``) are derived from the limits the way
    the plugin sizes them, with the baseline standing for the idle RSS.
    """

    n_workers: int
    memory_limit_bytes: tuple[int, ...]  #: per worker
    nthreads: tuple[int, ...]  #: per worker
    memory_budget_bytes: tuple[int, ...] = ()  #: per worker; () derived from the limits
    solo_budget_bytes: tuple[int, ...] = ()  #: per worker; () derived from the limits

    def __post_init__(self):
        if not (self.n_workers == len(self.memory_limit_bytes) == len(self.nthreads)):
            raise ValueError(f"ClusterShape: {self.n_workers} workers but "
                             f"{len(self.memory_limit_bytes)} limits and {len(self.nthreads)} thread counts")

    @classmethod
    def uniform(cls, n_workers: int, memory_limit_bytes: int, nthreads: int = 1) -> "ClusterShape":
        """``n_workers`` identical workers."""
        return cls(n_workers, (memory_limit_bytes,) * n_workers, (nthreads,) * n_workers)

    @property
    def total_threads(self) -> int:
        return sum(self.nthreads)

    @property
    def largest_memory_limit_bytes(self) -> int:
        return max(self.memory_limit_bytes, default=0)

    def shared_budgets(self, memory_fraction: float) -> tuple[int, ...]:
        return self.memory_budget_bytes or tuple(worker_budget_bytes(limit, memory_fraction)
                                                 for limit in self.memory_limit_bytes)

    def solo_budgets(self) -> tuple[int, ...]:
        return self.solo_budget_bytes or tuple(solo_budget_bytes(limit) for limit in self.memory_limit_bytes)

    def concurrent_tasks(self, task_peak_bytes: int, memory_fraction: float = DEFAULTS.memory_fraction) -> int:
        """How many tasks of one plan can run at once.

        Each task of a plan asks its task peak of the daemon's memory resource,
        so a worker runs at most ``min(threads, budget // task_peak)`` of them;
        a task too large to share any worker runs alone, one per worker whose
        solo budget holds it.
        """
        if task_peak_bytes <= 0:
            return max(1, self.total_threads)
        shared = self.shared_budgets(memory_fraction)
        slots = sum(min(threads, budget // task_peak_bytes) for threads, budget in zip(self.nthreads, shared))
        if slots == 0:
            slots = sum(1 for solo in self.solo_budgets() if solo >= task_peak_bytes)
        return max(1, slots)

    def task_budget_bytes(self, memory_fraction: float) -> int:
        """What one task may hold while sharing a worker: the largest worker's shared budget."""
        return max(self.shared_budgets(memory_fraction), default=0)

    def solo_task_budget_bytes(self) -> int:
        """What one task may hold running alone on its worker: the largest solo budget."""
        return max(self.solo_budgets(), default=0)

    def cluster_budget_bytes(self, memory_fraction: float) -> int:
        """What one group may hold: every worker's shared budget together."""
        return sum(self.shared_budgets(memory_fraction))


def worker_budget_bytes(memory_limit_bytes: int, memory_fraction: float) -> int:
    """What our tasks may hold on one worker: limit x fraction, less the worker's own baseline."""
    return max(0, int(memory_limit_bytes * memory_fraction) - WORKER_BASELINE_BYTES)


def solo_budget_bytes(memory_limit_bytes: int) -> int:
    """What one task alone may hold on a worker: below Dask's pause threshold by a margin, less the baseline."""
    return max(0, int(memory_limit_bytes * (DEFAULT_PAUSE_FRACTION - SOLO_MARGIN)) - WORKER_BASELINE_BYTES)


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

    def without(self, addresses) -> "ClusterSnapshot":
        """This snapshot with the workers at ``addresses`` withheld from our tasks (the same snapshot
        when none is here): status :data:`WITHHELD`, so neither running (admission's capacity, the
        tasks' resources) nor in the planning shape, but still among the workers a task could
        fit once they are back (a group is not failed for fitting only a worker withheld now)."""
        gone = set(addresses)
        if not gone.intersection(w.address for w in self.workers):
            return self
        return replace(self, workers=tuple(replace(w, status=WITHHELD) if w.address in gone else w
                                           for w in self.workers))

    def shape(self) -> ClusterShape:
        """The planning shape: running and paused workers (closing ones are gone)."""
        members = [w for w in self.workers if w.status in SHAPE_STATUSES]
        return ClusterShape(
            n_workers=len(members),
            memory_limit_bytes=tuple(w.memory_limit_bytes for w in members),
            nthreads=tuple(w.nthreads for w in members),
            memory_budget_bytes=tuple(w.memory_budget_bytes for w in members)
            if members and all(w.memory_budget_bytes for w in members) else (),
            solo_budget_bytes=tuple(w.solo_budget_bytes for w in members)
            if members and all(w.solo_budget_bytes for w in members) else (),
        )




"""The simulator's calibrated costs: one table per kind, each figure with where it comes from.

Task times (:data:`STRATEGY_TIMES`) were measured on this project's 2-core VM with
6,000,000-row files in the page cache: the CPU a task spends once its bytes have
arrived. Reading from storage is modelled apart (:mod:`throttler.simulation.model`).

* aligned: 0.045 s a file (the kernel measured 0.032-0.05 s a file: reading the
  value columns and the add); combine 0.02 s an input; final 0.15 s (the
  streamed final: keys, write). Fitted to ``benchmarks/batch.py --strategy auto``
  on this VM: its 302-file run measured 16-21 work thread-seconds (makespan
  median 9.7 s, simulated 9.8 s); checked on its 733-file run (24.4-25.7 s
  measured, 23.4 s simulated). Times from before the streamed final (0.09 s a
  file, final 0.5 s) doubled the simulated makespan.
* sum: 0.45 s a file (the streaming kernel 0.42-0.49 s); combine 0.15 s; final 0.4 s.
* groupby: 0.85 s a file (0.84-0.92 s); combine 0.8 s (0.63-0.79 s); final 1.9 s.

The daemon's own costs (:data:`DAEMON_COSTS`) and the scheduler's cost per task
come from ``benchmarks/daemon_costs.py``, which times the real code on this
machine: :func:`throttler.planner.make_plan`, :func:`throttler.graphs.build`,
one :func:`throttler.admission.choose` round, and no-op tasks through a real
``LocalCluster``. Rerun it on the target machine and pass the figures with the
``--*-seconds`` flags of ``throttler simulate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from throttler.cluster.snapshot import WORKER_BASELINE_BYTES
from throttler.planning.plan import FileInfo

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class StrategyTimes:
    """CPU time of each task shape of one strategy, for a file of ``Calibration.file_rows`` rows."""

    leaf_seconds_per_file: float
    combine_seconds_per_input: float
    final_seconds: float  #: besides one combine per input partial


#: Calibrated CPU times (see the module docstring for the measurements).
STRATEGY_TIMES = {
    "aligned": StrategyTimes(0.045, 0.02, 0.15),
    "sum": StrategyTimes(0.45, 0.15, 0.4),
    "groupby": StrategyTimes(0.85, 0.8, 1.9),
}


@dataclass(frozen=True)
class DaemonCosts:
    """Serial costs of the daemon (one process, its threads share the GIL) and of the scheduler.

    A group costs ``group_seconds + files x file_seconds + tasks x task_seconds``
    to plan, build and submit; an admission round ``round_seconds + entries x
    entry_seconds``; the scheduler ``scheduler_seconds_per_task`` per task it dispatches.
    """

    group_seconds: float
    file_seconds: float
    task_seconds: float
    round_seconds: float
    entry_seconds: float
    scheduler_seconds_per_task: float

    def group_cost_seconds(self, n_files: int, n_tasks: int) -> float:
        return self.group_seconds + n_files * self.file_seconds + n_tasks * self.task_seconds

    def round_cost_seconds(self, entries: int) -> float:
        return self.round_seconds + entries * self.entry_seconds


#: The one table of calibrated daemon and scheduler costs, from ``python benchmarks/daemon_costs.py``
#: on this 2-core VM (medians; see benchmarks/README.md for the run).
DAEMON_COSTS = DaemonCosts(
    group_seconds=0.00034,  #: make_plan's fixed part
    file_seconds=0.000033,  #: a footer read (32 us, page cache) plus make_plan's part per file (0.5 us)
    task_seconds=0.00014,  #: graphs.build per task
    round_seconds=0.000044,  #: one admission.choose round's fixed part
    entry_seconds=0.0000037,  #: one admission.choose round's part per queued entry
    scheduler_seconds_per_task=0.0026,  #: no-op tasks through a real LocalCluster (client, scheduler
    #: and 2 workers on 2 cores); the Dask documentation says about 1 ms on a dedicated scheduler
)


@dataclass(frozen=True)
class Calibration:
    """Per-file CPU times and sizes, worker and daemon costs."""

    strategy_times: dict = field(default_factory=lambda: dict(STRATEGY_TIMES))
    daemon: DaemonCosts = DAEMON_COSTS
    file_rows: int = 6_000_000  #: rows of the files the times were measured on
    file_decoded_bytes: int = 55_600_000  #: their decoded size
    worker_baseline_bytes: int = WORKER_BASELINE_BYTES  #: an idle worker process (132 MiB RSS measured)
    restart_seconds: float = 5.0  #: a killed worker's nanny restart until it runs again

    def times(self, strategy: str) -> StrategyTimes:
        return self.strategy_times[strategy]

    def cpu_scale(self, file: FileInfo) -> float:
        """CPU of one file relative to the calibrated one: it is per row."""
        return (file.rows / self.file_rows) if file.rows else 1.0

    def describe(self, strategy: str) -> str:
        t, d = self.times(strategy), self.daemon
        return (f"{strategy}: leaf {t.leaf_seconds_per_file:g} s/file, combine "
                f"{t.combine_seconds_per_input:g} s/input, final {t.final_seconds:g} s + combine "
                f"(CPU, per {self.file_rows:,}-row file); worker baseline "
                f"{self.worker_baseline_bytes / MIB:.0f} MiB; scheduler {d.scheduler_seconds_per_task * 1e3:g} "
                f"ms/task; daemon {d.group_seconds * 1e3:g} ms/group + {d.file_seconds * 1e6:g} us/file + "
                f"{d.task_seconds * 1e6:g} us/task; restart {self.restart_seconds:g} s")

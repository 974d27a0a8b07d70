"""A discrete-event simulation of a whole estate on a modelled Dask cluster.

It drives the real planner (:func:`throttler.planning.planner.make_plan`), estimator
(:class:`throttler.planning.estimator.Estimator`) and admission policy
(:func:`throttler.admission.policy.choose`, :class:`~throttler.admission.ledger.Ledger`)
against a cluster of ``workers x memory x threads`` modelled here, and compares
four ways to run the same batch (all groups arrive at time 0):

* ``all-at-once`` (a): every group submitted at once, tasks placed by threads only;
* ``fixed-pool`` (b): at most ``pool_size`` groups in flight (the seed's thread pool);
* ``resources`` (c): every group at once, each task restricted by the MEMORY resource;
* ``throttler`` (d): admission by :func:`~throttler.admission.policy.choose` over a
  :class:`~throttler.cluster.snapshot.ClusterSnapshot` built from the simulated state,
  with MEMORY restrictions, the ledger, and the daemon's re-plan after a kill.

The model of execution
----------------------
A planned group becomes the task tree :mod:`throttler.worker.graphs` builds: leaves of
``files_per_task`` files, combines of ``fan_in`` partials, one final. A task
holds its memory peak from dispatch to its end; a partial result stays on its
worker until its consumer ends. Estimated peaks come from the estimator (the
plan's figures); the "true" peak is the uncorrected model
(:func:`~throttler.planning.memory_model.raw_task_peaks`) times a random factor drawn from
``peak_noise`` (default 1: the model is exact). One greedy list scheduler places
ready tasks on free worker threads in priority order: earlier-submitted groups
first (Dask's generation order), then deeper tasks first (combines before new
leaves). Under (c) and (d) a task also needs ``min(task_peak, declared MEMORY)``
of its worker's MEMORY resource, as the daemon asks. The scheduler itself is a
single server costing ``scheduler_seconds_per_task`` per task dispatched.

A worker whose held memory (baseline + running peaks + results) exceeds
``pause_fraction`` of its limit starts no task; above ``kill_fraction`` its
nanny kills it: its running tasks and held results are lost (lost results are
recomputed from their inputs, as Dask does), each running task's failure count
rises, and a task failing more than ``allowed_failures`` times fails its group
with KilledWorker. The worker returns empty after ``restart_seconds``. Under (d)
a failed group is re-planned with :func:`~throttler.planning.planner.replan_after_oom`
and retried, as the daemon does; the other policies report it failed.

Calibration (measured on this 2-core VM, warm page cache, 6,000,000-row files)
------------------------------------------------------------------------------
Times per strategy (:data:`STRATEGY_TIMES`): leaf seconds per file, combine
seconds per input partial, final fixed seconds (plus one combine per input).

* aligned: 0.09 s/file (FACTS.md: reading value columns 0.033-0.049 s/file,
  numpy add 0.041-0.082 s/file; the throttler kernel measured 0.032-0.05
  s/file; 0.09 leaves room for page-cache misses at 0.8 GB/s); combine 0.05
  s/input (add measured 0.007 s, plus moving 48 MB between workers at about
  1 GB/s); final 0.5 s (measured 0.45-0.59 s: keys, sort, write).
* sum: 0.45 s/file (kernel streaming 3 files 0.42-0.49 s/file; FACTS.md
  index-aligned 0.17-0.28 s/file one shot); combine 0.15 s/input; final 0.4 s.
* groupby: 0.85 s/file (kernel 0.84-0.92 s/file with 3 files a leaf; FACTS.md
  concat+groupby 0.62-0.67 s/file); combine 0.8 s/input (0.63-0.79 measured);
  final 1.9 s (2-input final measured 3.5 s including its combine).

Memory: the per-row constants of :mod:`throttler.planning.estimator` with 6,000,000
rows, 50.4 MB on disk and 55.6 MB decoded per file; a worker process holds
``worker_baseline_bytes`` idle (:data:`throttler.cluster.snapshot.WORKER_BASELINE_BYTES`,
144 MiB: 132 MiB RSS measured with the libraries imported). Scheduler: 1 ms per task (the Dask
documentation; 2.3-2.5 ms per no-op task measured on this 2-core VM, where
client, scheduler and workers share the cores).

Admission rounds (d) run when capacity changes (a group ends, a worker
returns) at most every ``admission_interval_seconds``; a round considers the
first ``admission_window`` waiting groups in queue order (the head among
them), as the daemon holds a bounded number of claimed requests, and admits
every group :func:`~throttler.admission.policy.choose` admits (it reserves them
virtually as it goes); a round that admitted every group it considered
refills the window and runs again at once. A group's wait is counted from its
entry into that window, as the daemon counts it from its hand-off. Snapshots
are exact (no heartbeat lag): the ledger covers that lag in the real daemon.
The daemon's own costs (planning, graph building, the CPU time of
``choose``, submission) are not charged. Not modelled either: spilling to
disk, network contention, storage bandwidth.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from throttler.admission import policy as admission
from throttler.admission.ledger import Ledger, Reservation
from throttler.cluster.embedded import MEMORY_RESOURCE_SHARE
from throttler.cluster.snapshot import (
    WORKER_BASELINE_BYTES,
    ClusterShape,
    ClusterSnapshot,
    WorkerView,
)
from throttler.commands.generate import EstateSpec, group_sizes
from throttler.errors import DoesNotFit
from throttler.planning import planner
from throttler.planning.estimator import Estimator
from throttler.planning.memory_model import TaskPeaks, largest_file, raw_task_peaks
from throttler.planning.plan import STRATEGIES, FileInfo, Plan

GIB = 2**30
MIB = 2**20

POLICIES = ("all-at-once", "fixed-pool", "resources", "throttler")
POLICY_LABELS = {"all-at-once": "(a) all at once", "fixed-pool": "(b) fixed pool",
                 "resources": "(c) resources only", "throttler": "(d) throttler"}

#: Group-size classes of the report: (label, smallest, largest) files.
SIZE_CLASSES = (("2-10", 2, 10), ("11-100", 11, 100), ("101-1000", 101, 1000),
                (">1000", 1001, math.inf))


@dataclass(frozen=True)
class StrategyTimes:
    """Run time of each task shape of one strategy."""

    leaf_seconds_per_file: float
    combine_seconds_per_input: float
    final_seconds: float  #: besides one combine per input partial


#: Calibrated run times (see the module docstring for the measurements).
STRATEGY_TIMES = {
    "aligned": StrategyTimes(0.09, 0.05, 0.5),
    "sum": StrategyTimes(0.45, 0.15, 0.4),
    "groupby": StrategyTimes(0.85, 0.8, 1.9),
}


@dataclass(frozen=True)
class Calibration:
    """Per-file times and sizes, per-worker and scheduler costs."""

    strategy_times: dict = field(default_factory=lambda: dict(STRATEGY_TIMES))
    file_rows: int = 6_000_000
    file_size_bytes: int = 50_400_000
    file_decoded_bytes: int = 55_600_000
    worker_baseline_bytes: int = WORKER_BASELINE_BYTES
    scheduler_seconds_per_task: float = 0.001
    restart_seconds: float = 5.0  #: a killed worker's nanny restart until it runs again

    def times(self, strategy: str) -> StrategyTimes:
        return self.strategy_times[strategy]

    def file_info(self) -> FileInfo:
        return FileInfo("/sim/file.parquet", self.file_size_bytes, self.file_rows, self.file_decoded_bytes)

    def describe(self, strategy: str) -> str:
        t = self.times(strategy)
        return (f"{strategy}: leaf {t.leaf_seconds_per_file:g} s/file, combine "
                f"{t.combine_seconds_per_input:g} s/input, final {t.final_seconds:g} s + combine; "
                f"files {self.file_rows:,} rows, {self.file_size_bytes / 1e6:.1f} MB; worker baseline "
                f"{self.worker_baseline_bytes / MIB:.0f} MiB; scheduler "
                f"{self.scheduler_seconds_per_task * 1e3:g} ms/task; restart {self.restart_seconds:g} s")


@dataclass(frozen=True)
class ModelCluster:
    """Identical workers, with Dask's memory thresholds."""

    n_workers: int
    memory_limit_bytes: int
    threads_per_worker: int
    memory_resource_bytes: int | None = None  #: declared MEMORY (None: the default share of the limit)
    pause_fraction: float = 0.8
    kill_fraction: float = 0.95
    allowed_failures: int = 3

    @property
    def threads(self) -> int:
        return self.n_workers * self.threads_per_worker

    @property
    def resource_bytes(self) -> int:
        if self.memory_resource_bytes is None:
            return int(self.memory_limit_bytes * MEMORY_RESOURCE_SHARE)
        return self.memory_resource_bytes

    def shape(self) -> ClusterShape:
        return ClusterShape.uniform(self.n_workers, self.memory_limit_bytes, self.threads_per_worker, True)

    def capacity_bytes(self, memory_fraction: float) -> int:
        """What admission may fill: every limit x the fraction."""
        return self.n_workers * int(self.memory_limit_bytes * memory_fraction)


@dataclass(frozen=True)
class Scenario:
    """A policy and its tunables."""

    policy: str
    strategy: str = "auto"
    pool_size: int = 32  #: groups in flight under fixed-pool
    memory_fraction: float = admission.DEFAULT_MEMORY_FRACTION
    fan_in: int = planner.DEFAULT_FAN_IN
    max_head_wait_seconds: float = admission.DEFAULT_MAX_HEAD_WAIT_SECONDS
    admission_window: int = 32  #: waiting groups one round considers
    admission_interval_seconds: float = 0.1  #: least time between admission rounds
    peak_noise: tuple[float, float] = (1.0, 1.0)  #: true peak / model, drawn uniformly per task
    max_group_attempts: int = 4  #: the daemon's max_attempts after KilledWorker
    seed: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")


# --------------------------------------------------------------------------- the estate


def seed_estate(total_files: int = 140_000, seed: int = 0, max_files: int = 18_000,
                min_files: int = 2) -> list[int]:
    """Long-tailed group sizes (:func:`throttler.commands.generate.group_sizes`) totalling about ``total_files``.

    The number of groups is the smallest whose sizes reach ``total_files``.
    """
    def sizes(groups: int) -> list[int]:
        return group_sizes(EstateSpec(groups=groups, min_files=min_files, max_files=max_files, seed=seed))

    lo, hi = 1, max(1, total_files // min_files)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(sizes(mid)) >= total_files:
            hi = mid
        else:
            lo = mid + 1
    return sizes(lo)


# --------------------------------------------------------------------------- plans and trees


def tree_shape(plan: Plan) -> tuple[list[int], list[list[int]], int]:
    """(files of each leaf, inputs of each combine per level, inputs of the final), as graphs.build."""
    n, per = plan.n_files, max(1, plan.files_per_task)
    leaves = [min(per, n - i) for i in range(0, n, per)]
    fan_in, width, levels = max(2, plan.fan_in), len(leaves), []
    while width > fan_in:
        levels.append([min(fan_in, width - j) for j in range(0, width, fan_in)])
        width = len(levels[-1])
    return leaves, levels, width


def plan_work(plan: Plan, times: StrategyTimes, peaks: TaskPeaks) -> tuple[float, float, int, float]:
    """(thread-seconds, critical path seconds, tasks, byte-seconds) of one clean run of a plan.

    Byte-seconds: each task's ``peaks`` figure times its run time.
    """
    leaves, levels, final_inputs = tree_shape(plan)
    combine, leaf = times.combine_seconds_per_input, times.leaf_seconds_per_file
    final = final_inputs * combine + times.final_seconds
    combines = sum(map(sum, levels)) * combine
    work = sum(leaves) * leaf + combines + final
    path = max(leaves) * leaf + sum(max(lv) for lv in levels) * combine + final
    byte_seconds = (sum(leaves) * leaf * peaks.leaf_bytes + combines * peaks.combine_bytes
                    + final * peaks.final_bytes)
    tasks = 1 if len(leaves) == 1 else len(leaves) + sum(map(len, levels)) + 1  # one leaf: fused, as graphs.build
    return work, path, tasks, byte_seconds


def make_group_plan(name: str, n_files: int, strategy: str, shape: ClusterShape, estimator: Estimator,
                    scenario: Scenario, calibration: Calibration) -> Plan:
    """The real planner on ``n_files`` seed-shaped files."""
    return planner.make_plan(name, [calibration.file_info()] * n_files, strategy, shape, estimator,
                             memory_fraction=scenario.memory_fraction, fan_in=scenario.fan_in)


#: Plans by everything the planner reads (see :func:`cached_plan`); cleared when large.
_PLANS: dict[tuple, Plan | DoesNotFit] = {}
_PLANS_MAX = 100_000


def cached_plan(name: str, n_files: int, shape: ClusterShape, estimator: Estimator,
                scenario: Scenario, calibration: Calibration) -> Plan:
    """:func:`make_group_plan`, remembered: the planner is pure and every simulated file is the same.

    The key holds all the planner reads, the estimator's corrections
    included, so a plan made after the estimator learned is made afresh.
    Raises DoesNotFit as the planner does.
    """
    key = (n_files, scenario.strategy, shape, scenario.memory_fraction, scenario.fan_in,
           calibration.file_info(), tuple(estimator.correction(s) for s in STRATEGIES))
    plan = _PLANS.get(key)
    if plan is None:
        try:
            plan = make_group_plan("", n_files, scenario.strategy, shape, estimator, scenario, calibration)
        except DoesNotFit as exc:
            plan = exc
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    if isinstance(plan, DoesNotFit):
        raise DoesNotFit(str(plan).replace("group :", f"group {name}:", 1))
    return plan.with_changes(group=name)


def plan_peaks(plan: Plan, estimator: Estimator) -> tuple[TaskPeaks, TaskPeaks]:
    """(the estimate, with the estimator's correction in force, the uncorrected model: the "truth").

    Right after planning the estimate's peak is the plan's ``task_peak_bytes``.
    """
    n_leaves = plan.n_leaf_tasks
    safety = planner.ATTEMPT_SAFETY_FACTOR ** (plan.attempt - 1)
    files = list(plan.files[:1])  # every simulated file is the same
    est = estimator.task_peaks(plan.strategy, files, files_per_task=plan.files_per_task,
                               fan_in=plan.fan_in, n_leaves=n_leaves, safety=safety)
    raw = raw_task_peaks(plan.strategy, largest_file(files), plan.files_per_task, plan.fan_in, n_leaves)
    return est, raw


# --------------------------------------------------------------------------- simulation state

PENDING, READY, RUNNING, DONE, CONSUMED, LOST, CANCELLED = range(7)
EV_TASK_DONE, EV_WORKER_BACK, EV_ROUND = range(3)


class _Task:
    __slots__ = ("run", "depth", "index", "inputs", "consumer", "n_waiting", "duration", "peak",
                 "result", "state", "version", "worker", "inc", "started", "failures")

    def __init__(self, run, depth, index, inputs, duration, peak, result):
        self.run, self.depth, self.index, self.inputs = run, depth, index, inputs
        self.consumer = None
        self.n_waiting = len(inputs)
        self.duration, self.peak, self.result = duration, peak, result
        self.state, self.version, self.worker, self.inc = PENDING, 0, -1, 0
        self.started, self.failures = 0.0, 0


class _Run:
    """One submission of one group."""

    __slots__ = ("group", "plan", "key", "demand", "order", "state", "tasks")

    def __init__(self, group, plan, key, demand, order):
        self.group, self.plan, self.key, self.demand, self.order = group, plan, key, demand, order
        self.state, self.tasks = RUNNING, []


class _Group:
    __slots__ = ("name", "n_files", "plan", "attempts", "enqueued_at", "not_before", "launched_at",
                 "first_start", "ended_at", "ok", "error", "run")

    def __init__(self, name, n_files):
        self.name, self.n_files, self.plan, self.attempts = name, n_files, None, 0
        self.enqueued_at = self.not_before = 0.0
        self.launched_at = self.first_start = self.ended_at = None
        self.ok, self.error, self.run = None, "", None


@dataclass(frozen=True)
class ClassWait:
    groups: int
    p50_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class Result:
    """What one simulated batch did."""

    policy: str
    strategy: str
    workers: int
    threads: int
    groups: int
    files: int
    completed: int
    failed: int
    stuck: int  #: never admitted or never finished (a deadlock)
    makespan_seconds: float
    busy_thread_seconds: float
    lost_thread_seconds: float  #: work lost with killed workers
    utilisation: float
    capacity_bytes: int  #: admission capacity: every limit x memory_fraction
    peak_held_bytes: int  #: most memory held cluster-wide (baseline, running tasks, results)
    peak_worker_fraction: float  #: most one worker held / its memory limit
    peak_reserved_bytes: int  #: most the ledger held (throttler only)
    kills: int
    paused_worker_seconds: float
    start_delay: dict  #: size class -> ClassWait (time 0 to the first task)
    biggest_group_files: int
    biggest_group_start_seconds: float | None
    biggest_group_admission_wait_seconds: float | None  #: from its entry in the admission window
    max_admission_wait_seconds: float  #: the longest wait from window entry (throttler)
    tasks_run: int
    admission_rounds: int
    wall_seconds: float


# --------------------------------------------------------------------------- the simulator


class Simulation:
    """One batch, one policy, one modelled cluster. Call :meth:`run` once."""

    def __init__(self, sizes: list[int], cluster: ModelCluster, scenario: Scenario,
                 calibration: Calibration = Calibration(), estimator: Estimator | None = None):
        self.cluster, self.scenario, self.cal = cluster, scenario, calibration
        self.estimator = estimator or Estimator()
        self.shape = cluster.shape()
        self.rng = np.random.default_rng(scenario.seed)
        self.groups = [_Group(f"g{i:05d}", n) for i, n in enumerate(sizes)]
        self.queue = deque(self.groups)
        self.window: list[_Group] = []
        self.ledger = Ledger()
        self.policy = admission.AdmissionPolicy(scenario.memory_fraction, scenario.max_head_wait_seconds)
        n = cluster.n_workers
        self.names = [f"w{w:04d}" for w in range(n)]
        self.free_threads = [cluster.threads_per_worker] * n
        self.free_res = [cluster.resource_bytes] * n
        self.running_bytes, self.result_bytes = [0] * n, [0] * n
        self.running: list[dict] = [{} for _ in range(n)]  # dicts, not sets: a fixed order
        self.results: list[dict] = [{} for _ in range(n)]
        self.up, self.paused, self.paused_since = [True] * n, [False] * n, [0.0] * n
        self.incarnation = [0] * n
        self.idle = set(range(n))
        self.kill_bytes = int(cluster.memory_limit_bytes * cluster.kill_fraction)
        self.pause_bytes = int(cluster.memory_limit_bytes * cluster.pause_fraction)
        self.buckets: dict[int, list] = {}
        self.events: list = []
        self.seq = itertools.count()
        self.order = itertools.count()
        self.now = self.sched_free_at = 0.0
        self.last_round = -math.inf
        self.round_pending = self.new_ready = False
        self.in_flight = 0
        self.task_bytes = self.peak_task_bytes = self.peak_worker_bytes = 0
        self.peak_reserved = 0
        self.busy = self.lost = self.paused_seconds = 0.0
        self.kills = self.tasks_run = self.rounds = 0

    # ----------------------------------------------------------------- driver

    def run(self) -> Result:
        started = time.perf_counter()
        if self.scenario.policy in ("all-at-once", "resources"):
            for g in list(self.queue):
                self._plan_and_launch(g)
            self.queue.clear()
        elif self.scenario.policy == "fixed-pool":
            self._pool_fill()
        else:
            self._request_round()
        self._offer()
        handlers = (self._on_task_done, self._on_worker_back, self._on_round)
        while self.events:
            at, _, kind, obj = heapq.heappop(self.events)
            self.now = at
            handlers[kind](obj)
            if self.new_ready:
                self._offer()
        return self._result(time.perf_counter() - started)

    def _push_event(self, at: float, kind: int, obj) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, obj))

    # ----------------------------------------------------------------- groups

    def _plan(self, g: _Group) -> bool:
        """Plan ``g`` for the modelled cluster; a group that can never fit fails here."""
        try:
            g.plan = cached_plan(g.name, g.n_files, self.shape, self.estimator, self.scenario, self.cal)
        except DoesNotFit as exc:
            self._group_ended(g, False, f"DoesNotFit: {exc}")
            return False
        return True

    def _plan_and_launch(self, g: _Group) -> None:
        if self._plan(g):
            self._launch(g)

    def _launch(self, g: _Group) -> None:
        """Submit the group's current plan: build its task tree, make its leaves ready."""
        plan = g.plan
        restricted = self.scenario.policy in ("resources", "throttler")
        demand = min(plan.task_peak_bytes, self.cluster.resource_bytes) if restricted else 0
        g.attempts += 1
        run = _Run(g, plan, f"{g.name}#{g.attempts}", demand, next(self.order))
        g.run, g.launched_at = run, self.now
        self.in_flight += 1
        run.tasks = self._build_tasks(run)
        for t in run.tasks:
            if not t.inputs:
                self._push_ready(t)

    def _build_tasks(self, run: _Run) -> list[_Task]:
        plan, times = run.plan, self.cal.times(run.plan.strategy)
        _, raw = plan_peaks(plan, self.estimator)
        leaves, levels, _ = tree_shape(plan)
        fan_in = max(2, plan.fan_in)
        lo, hi = self.scenario.peak_noise
        noise = iter(self.rng.uniform(lo, hi, len(leaves) + sum(map(len, levels)) + 1).tolist()
                     if hi > lo else itertools.repeat(lo))
        comb = times.combine_seconds_per_input
        if len(leaves) == 1:  # graphs.build runs a one-leaf group as one task: leaf, then final
            return [_Task(run, 0, 0, [], leaves[0] * times.leaf_seconds_per_file + comb + times.final_seconds,
                          int(max(raw.leaf_bytes, raw.final_bytes) * next(noise)), 0)]
        level = [_Task(run, 0, i, [], files * times.leaf_seconds_per_file,
                       int(raw.leaf_bytes * next(noise)), raw.result_bytes) for i, files in enumerate(leaves)]
        tasks = list(level)
        for depth, widths in enumerate(levels, start=1):
            level = [self._parent(run, depth, i, level[i * fan_in:i * fan_in + k], k * comb,
                                  int(raw.combine_bytes * next(noise)), raw.result_bytes)
                     for i, k in enumerate(widths)]
            tasks.extend(level)
        final = self._parent(run, len(levels) + 1, 0, level, len(level) * comb + times.final_seconds,
                             int(raw.final_bytes * next(noise)), 0)
        tasks.append(final)
        return tasks

    @staticmethod
    def _parent(run, depth, index, inputs, duration, peak, result) -> _Task:
        t = _Task(run, depth, index, inputs, duration, peak, result)
        for i in inputs:
            i.consumer = t
        return t

    def _group_ended(self, g: _Group, ok: bool, error: str = "") -> None:
        g.ok, g.error, g.ended_at = ok, error, self.now
        if g.first_start is None and ok:
            g.first_start = self.now

    def _run_done(self, run: _Run) -> None:
        run.state = DONE
        g = run.group
        self.in_flight -= 1
        self._group_ended(g, True)
        if self.scenario.policy == "throttler":
            self._release(run)
            peak = max(t.peak for t in run.tasks)
            self.estimator.observe(run.plan.strategy, run.plan.task_peak_bytes, peak, run.plan.estimate_factor)
        self._after_group_change()

    def _run_failed(self, run: _Run, reason: str) -> None:
        """KilledWorker: cancel the run; the throttler re-plans and retries, others give up."""
        run.state = CANCELLED
        self.in_flight -= 1
        for t in run.tasks:
            if t.state == DONE:
                self._free_result(t)
            if t.state in (PENDING, READY, LOST):
                t.state = CANCELLED
        g = run.group
        if self.scenario.policy == "throttler":
            self._release(run)
            if g.attempts < self.scenario.max_group_attempts:
                self._retry(g, run.plan)
                return
        self._group_ended(g, False, reason)
        self._after_group_change()

    def _retry(self, g: _Group, plan: Plan) -> None:
        """What the daemon does after KilledWorker: learn, re-plan, wait, queue again."""
        self.estimator.observe(plan.strategy, plan.task_peak_bytes, 2 * plan.task_peak_bytes, plan.estimate_factor)
        try:
            g.plan = planner.replan_after_oom(plan, self.shape, self.estimator,
                                              memory_fraction=self.scenario.memory_fraction)
        except DoesNotFit as exc:
            self._group_ended(g, False, f"DoesNotFit: {exc}")
            self._after_group_change()
            return
        g.enqueued_at = self.now
        g.not_before = self.now + min(30.0, 2.0 ** (g.attempts - 1))  # the daemon's backoff, no jitter
        self.window.append(g)
        self._push_event(g.not_before, EV_ROUND, None)
        self._after_group_change()

    def _after_group_change(self) -> None:
        if self.scenario.policy == "fixed-pool":
            self._pool_fill()
        elif self.scenario.policy == "throttler":
            self._request_round()

    # ----------------------------------------------------------------- policies (b) and (d)

    def _pool_fill(self) -> None:
        while self.in_flight < self.scenario.pool_size and self.queue:
            self._plan_and_launch(self.queue.popleft())
        self.new_ready = True

    def _request_round(self) -> None:
        if not self.round_pending:
            self.round_pending = True
            at = max(self.now, self.last_round + self.scenario.admission_interval_seconds)
            self._push_event(at, EV_ROUND, None)

    def _on_round(self, _obj) -> None:
        """One admission round: the real :func:`admission.choose` over the window."""
        self.round_pending, self.last_round = False, self.now
        self.rounds += 1
        while len(self.window) < self.scenario.admission_window and self.queue:
            g = self.queue.popleft()
            if self._plan(g):
                g.enqueued_at = self.now
                self.window.append(g)
        ready = [g for g in self.window if g.not_before <= self.now]
        if not ready:
            return
        entries = [admission.QueueEntry(g.plan, 0, g.enqueued_at, f"{g.name}#{g.attempts + 1}") for g in ready]
        choices = admission.choose(self._snapshot(), self.ledger.items(), entries, self.now, self.policy)
        by_key = {e.reservation_key: g for e, g in zip(entries, ready)}
        taken = set()
        for choice in choices:
            g = by_key[choice.entry.reservation_key]
            taken.add(g.name)
            if choice.decision.admit:
                self._reserve(choice.entry)
                self._launch(g)
            else:
                self._group_ended(g, False, f"DoesNotFit: {choice.decision.reason}")
        self.window = [g for g in self.window if g.name not in taken]
        if any(c.decision.admit for c in choices):  # admits only add within a round: its end is its peak
            counted = admission.Tally.of(self.ledger.items()).total_bytes(self.cluster.threads)
            self.peak_reserved = max(self.peak_reserved, counted)  # as admission counts it (capped)
        if len(taken) == len(ready) and self.queue:  # the window, not memory, was the limit: go on
            self.round_pending = True
            self._push_event(self.now, EV_ROUND, None)

    def _reserve(self, entry: admission.QueueEntry) -> None:
        plan = entry.plan
        self.ledger.reserve(Reservation(plan.group, entry.reservation_key, plan.group_peak_bytes,
                                                  plan.task_peak_bytes, self.now, plan.running_bytes))

    def _release(self, run: _Run) -> None:
        self.ledger.release(run.key)

    def _snapshot(self) -> ClusterSnapshot:
        """The modelled cluster as :func:`throttler.cluster.scheduler.read_snapshot` would see it (exact)."""
        c, base = self.cluster, self.cal.worker_baseline_bytes
        workers = tuple(
            WorkerView(self.names[w], f"sim://{self.names[w]}", "paused" if self.paused[w] else "running",
                       c.threads_per_worker, c.memory_limit_bytes,
                       process_bytes=base + self.running_bytes[w] + self.result_bytes[w],
                       managed_bytes=self.result_bytes[w], unmanaged_old_bytes=base,
                       memory_resource=float(c.resource_bytes),
                       used_memory_resource=float(c.resource_bytes - self.free_res[w]))
            for w in range(c.n_workers) if self.up[w])
        return ClusterSnapshot(workers, self.now)

    # ----------------------------------------------------------------- the task scheduler

    def _push_ready(self, t: _Task) -> None:
        t.state = READY
        t.version += 1
        run = t.run
        heapq.heappush(self.buckets.setdefault(run.demand, []),
                       (run.order, -t.depth, t.index, t.version, t))
        self.new_ready = True

    def _pop_ready(self, limit: int) -> _Task | None:
        """The highest-priority ready task needing at most ``limit`` MEMORY."""
        best = None
        for demand in list(self.buckets):
            heap = self.buckets[demand]
            while heap and (heap[0][4].state != READY or heap[0][4].version != heap[0][3]):
                heapq.heappop(heap)
            if not heap:
                del self.buckets[demand]
            elif demand <= limit and (best is None or heap[0] < best[0]):
                best = heap
        return heapq.heappop(best)[4] if best is not None else None

    def _offer(self) -> None:
        """Newly ready tasks: free threads take one each per pass (spreading the load)."""
        self.new_ready = False
        progress = True
        while progress and self.buckets and self.idle:
            progress = False
            for w in sorted(self.idle):
                if self._can_start(w):
                    t = self._pop_ready(self.free_res[w])
                    if t is not None:
                        self._start(t, w)
                        progress = True

    def _can_start(self, w: int) -> bool:
        return self.up[w] and not self.paused[w] and self.free_threads[w] > 0

    def _fill(self, w: int) -> None:
        while self._can_start(w):
            t = self._pop_ready(self.free_res[w])
            if t is None:
                return
            self._start(t, w)

    def _start(self, t: _Task, w: int) -> None:
        run = t.run
        self.free_threads[w] -= 1
        self.free_res[w] -= run.demand
        if not self.free_threads[w]:
            self.idle.discard(w)
        start = max(self.now, self.sched_free_at) + self.cal.scheduler_seconds_per_task
        self.sched_free_at = start
        t.state, t.worker, t.inc, t.started = RUNNING, w, self.incarnation[w], start
        if run.group.first_start is None:
            run.group.first_start = start
        self.running[w][t] = None
        self.tasks_run += 1
        self._push_event(start + t.duration, EV_TASK_DONE, t)
        self._add_bytes(w, t.peak, running=True)

    def _add_bytes(self, w: int, n: int, running: bool) -> None:
        """Account ``n`` bytes (negative: freed) on ``w``: peaks, then pause, kill or resume."""
        if running:
            self.running_bytes[w] += n
        else:
            self.result_bytes[w] += n
        self.task_bytes += n
        held = self.running_bytes[w] + self.result_bytes[w] + self.cal.worker_baseline_bytes
        if n > 0:
            self.peak_task_bytes = max(self.peak_task_bytes, self.task_bytes)
            self.peak_worker_bytes = max(self.peak_worker_bytes, held)
            if held > self.kill_bytes:
                self._kill(w)
                return
        if not self.up[w]:
            return
        paused = held > self.pause_bytes
        if paused != self.paused[w]:
            self._set_paused(w, paused)
        if self.free_threads[w] and not paused:
            self.idle.add(w)
        else:
            self.idle.discard(w)

    def _set_paused(self, w: int, paused: bool) -> None:
        self.paused[w] = paused
        if paused:
            self.paused_since[w] = self.now
        else:
            self.paused_seconds += self.now - self.paused_since[w]
            self.new_ready = True

    def _on_task_done(self, t: _Task) -> None:
        w = t.worker
        if t.state != RUNNING or t.inc != self.incarnation[w]:
            return  # lost with its worker
        del self.running[w][t]
        self.free_threads[w] += 1
        self.free_res[w] += t.run.demand
        self.busy += t.duration
        self._add_bytes(w, -t.peak, running=True)
        if t.run.state != RUNNING:  # its group failed meanwhile: the result is dropped
            t.state = CANCELLED
        else:
            self._task_succeeded(t, w)
        self._fill(w)

    def _task_succeeded(self, t: _Task, w: int) -> None:
        t.state = DONE
        for i in t.inputs:
            self._free_result(i)
        if t.consumer is None:
            self._run_done(t.run)
            return
        self.results[w][t] = None
        self._add_bytes(w, t.result, running=False)
        c = t.consumer
        c.n_waiting -= 1
        if c.n_waiting == 0 and c.state == PENDING:
            self._push_ready(c)

    def _free_result(self, t: _Task) -> None:
        if t.state != DONE:
            return
        t.state = CONSUMED
        del self.results[t.worker][t]
        self._add_bytes(t.worker, -t.result, running=False)

    # ----------------------------------------------------------------- killed workers

    def _kill(self, w: int) -> None:
        """The nanny kills ``w``: its running tasks and held results are lost."""
        self.kills += 1
        lost_running, lost_results = list(self.running[w]), list(self.results[w])
        self.task_bytes -= self.running_bytes[w] + self.result_bytes[w]
        if self.paused[w]:
            self.paused_seconds += self.now - self.paused_since[w]
        self.running_bytes[w] = self.result_bytes[w] = 0
        self.running[w], self.results[w] = {}, {}
        self.up[w], self.paused[w], self.free_threads[w] = False, False, 0
        self.free_res[w] = self.cluster.resource_bytes
        self.incarnation[w] += 1
        self.idle.discard(w)
        for t in lost_results:
            t.state = LOST
        for t in lost_running:
            ran = max(0.0, self.now - t.started)
            self.busy += ran
            self.lost += ran
            t.state, t.failures = LOST, t.failures + 1
        for t in lost_running:
            self._recover_running(t)
        for t in lost_results:
            self._recover_result(t)
        self._push_event(self.now + self.cal.restart_seconds, EV_WORKER_BACK, w)

    def _recover_running(self, t: _Task) -> None:
        if t.run.state != RUNNING:
            return
        if t.failures > self.cluster.allowed_failures:
            self._run_failed(t.run, f"KilledWorker: a task was running on {t.failures} workers that died")
        else:
            self._recompute(t)

    def _recover_result(self, t: _Task) -> None:
        """A lost partial is recomputed only if its consumer has not started with it."""
        if t.state != LOST or t.run.state != RUNNING:
            return
        c = t.consumer
        if c.state not in (PENDING, READY):
            t.state = CONSUMED
            return
        if c.state == READY:
            c.state, c.n_waiting = PENDING, 0
            c.version += 1
        c.n_waiting += 1
        self._recompute(t)

    def _recompute(self, t: _Task) -> None:
        """Run ``t`` again, first recomputing any input no longer held."""
        t.state = PENDING
        waiting = 0
        for i in t.inputs:
            if i.state in (LOST, CONSUMED):
                self._recompute(i)
            if i.state != DONE:
                waiting += 1
        t.n_waiting = waiting
        if not waiting:
            self._push_ready(t)

    def _on_worker_back(self, w: int) -> None:
        self.up[w] = True
        self.free_threads[w] = self.cluster.threads_per_worker
        self.idle.add(w)
        self.new_ready = True
        if self.scenario.policy == "throttler":
            self._request_round()

    # ----------------------------------------------------------------- the report

    def _result(self, wall_seconds: float) -> Result:
        gs = self.groups
        ended = [g.ended_at for g in gs if g.ended_at is not None]
        makespan = max(ended, default=0.0)
        threads = self.cluster.threads
        big = max(gs, key=lambda g: g.n_files)
        waits = [g.launched_at - g.enqueued_at for g in gs if g.launched_at is not None]
        big_wait = None if big.launched_at is None else big.launched_at - big.enqueued_at
        return Result(
            policy=self.scenario.policy, strategy=self.scenario.strategy, workers=self.cluster.n_workers,
            threads=threads, groups=len(gs), files=sum(g.n_files for g in gs),
            completed=sum(1 for g in gs if g.ok), failed=sum(1 for g in gs if g.ok is False),
            stuck=sum(1 for g in gs if g.ok is None), makespan_seconds=makespan,
            busy_thread_seconds=self.busy, lost_thread_seconds=self.lost,
            utilisation=self.busy / (threads * makespan) if makespan else 0.0,
            capacity_bytes=self.cluster.capacity_bytes(self.scenario.memory_fraction),
            peak_held_bytes=self.peak_task_bytes + self.cluster.n_workers * self.cal.worker_baseline_bytes,
            peak_worker_fraction=self.peak_worker_bytes / self.cluster.memory_limit_bytes,
            peak_reserved_bytes=self.peak_reserved, kills=self.kills,
            paused_worker_seconds=self.paused_seconds, start_delay=_class_waits(gs),
            biggest_group_files=big.n_files, biggest_group_start_seconds=big.first_start,
            biggest_group_admission_wait_seconds=big_wait, max_admission_wait_seconds=max(waits, default=0.0),
            tasks_run=self.tasks_run, admission_rounds=self.rounds, wall_seconds=wall_seconds)


def _class_waits(groups: list[_Group]) -> dict[str, ClassWait]:
    out = {}
    for label, lo, hi in SIZE_CLASSES:
        starts = [g.first_start for g in groups if lo <= g.n_files <= hi and g.first_start is not None]
        if starts:
            out[label] = ClassWait(len(starts), float(np.median(starts)), max(starts))
    return out


def simulate(sizes: list[int], cluster: ModelCluster, scenario: Scenario,
             calibration: Calibration = Calibration()) -> Result:
    """Run one batch of groups of ``sizes`` files under ``scenario`` on ``cluster``."""
    return Simulation(sizes, cluster, scenario, calibration).run()


# --------------------------------------------------------------------------- lower bounds


@dataclass(frozen=True)
class Bounds:
    """What no policy can beat on this cluster, from the plans of a fresh estimator."""

    work_thread_seconds: float
    work_bound_seconds: float  #: total work / threads
    critical_path_seconds: float  #: the longest single group, run alone
    scheduler_bound_seconds: float  #: tasks x scheduler cost
    memory_bound_seconds: float  #: task byte-seconds / what the workers may hold without a kill
    tasks: int

    @property
    def lower_bound_seconds(self) -> float:
        return max(self.work_bound_seconds, self.critical_path_seconds, self.scheduler_bound_seconds,
                   self.memory_bound_seconds)


def lower_bounds(sizes: list[int], cluster: ModelCluster, scenario: Scenario,
                 calibration: Calibration = Calibration()) -> Bounds:
    """Bounds of a batch; the memory bound uses the true (uncorrected) peaks of
    :func:`plan_peaks` and holds for any run without a killed worker."""
    estimator, shape = Estimator(), cluster.shape()
    work = path = byte_seconds = 0.0
    tasks = 0
    per_size: dict[int, tuple[float, float, int, float]] = {}
    for n in sizes:
        if n not in per_size:
            plan = cached_plan("", n, shape, estimator, scenario, calibration)
            per_size[n] = plan_work(plan, calibration.times(plan.strategy), plan_peaks(plan, estimator)[1])
        w, p, k, b = per_size[n]
        work, path, tasks, byte_seconds = work + w, max(path, p), tasks + k, byte_seconds + b
    holdable = cluster.n_workers * (cluster.kill_fraction * cluster.memory_limit_bytes
                                    - calibration.worker_baseline_bytes)
    return Bounds(work, work / cluster.threads, path, tasks * calibration.scheduler_seconds_per_task,
                  byte_seconds / holdable, tasks)

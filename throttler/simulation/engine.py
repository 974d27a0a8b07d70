"""The discrete-event loop: tasks on modelled workers, reads as shared flows, memory, kills.

A planned group becomes the task tree :mod:`throttler.graphs` builds: leaves
of ``files_per_task`` files, combines of ``fan_in`` partials, one final. A
leaf first reads its files' bytes as a flow (:class:`~throttler.simulation.model.Bandwidth`),
then spends its CPU time and request latency. A task holds its memory peak
from dispatch to its end; a partial result stays on its worker until its
consumer ends. One greedy list scheduler places ready tasks on free threads
in priority order (earlier-submitted groups first, then deeper tasks), each
dispatch costing the scheduler, a single server, its per-task cost. Whoever
submits (the daemon or a client) is a single server too: a group's tasks
become ready only once its plan, graph and submission have been paid for.

A worker whose held memory passes ``pause_fraction`` of its limit starts no
task; past ``kill_fraction`` its nanny kills it: running tasks, reads and held
results are lost (results are recomputed, as Dask does), and a task failing
more than ``allowed_failures`` times fails its group with KilledWorker. The
worker returns after ``restart_seconds``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque

import numpy as np

from throttler.errors import DoesNotFit
from throttler.planning.estimator import Estimator
from throttler.simulation import policies
from throttler.simulation.calibration import Calibration
from throttler.simulation.estate import Estate
from throttler.simulation.model import Bandwidth, ModelCluster, Scenario
from throttler.simulation.plans import PlanCache, plan_peaks, tree_shape
from throttler.simulation.tasks import (
    CANCELLED,
    CONSUMED,
    DONE,
    LOST,
    PENDING,
    READY,
    RUNNING,
    Group,
    Run,
    Task,
)

EV_TASK_DONE, EV_WORKER_BACK, EV_ROUND, EV_BEGIN, EV_SUBMITTED = range(5)


class Simulation:
    """One batch, one policy, one modelled cluster. Call :meth:`run` once."""

    def __init__(self, estate: Estate, cluster: ModelCluster, scenario: Scenario,
                 calibration: Calibration = Calibration(), estimator: Estimator | None = None):
        self.estate, self.cluster, self.scenario, self.cal = estate, cluster, scenario, calibration
        self.estimator = estimator or Estimator()
        self.shape = cluster.shape()
        self.plans = PlanCache(self.shape, scenario)
        self.policy = policies.make(scenario)
        self.rng = np.random.default_rng(scenario.seed)
        self.groups = [Group(spec) for spec in estate.groups]
        self.queue = deque(self.groups)
        self._init_workers(cluster)
        self.flows = Bandwidth(cluster.n_workers, cluster.storage)
        self.limited_storage = not (math.isinf(cluster.storage.aggregate_bytes_per_second)
                                    and math.isinf(cluster.storage.node_bytes_per_second))
        self.buckets: dict[int, list] = {}
        self.events: list = []
        self.seq, self.order = itertools.count(), itertools.count()
        self.now = self.sched_free_at = self.daemon_free_at = 0.0
        self.new_ready = False
        self.in_flight = 0
        self.task_bytes = self.peak_task_bytes = self.peak_worker_bytes = 0
        self.busy = self.lost = self.paused_seconds = self.daemon_seconds = 0.0
        self.kills = self.tasks_run = 0
        self.bytes_read = 0

    def _init_workers(self, cluster: ModelCluster) -> None:
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

    # ----------------------------------------------------------------- driver

    def run(self):
        from throttler.simulation.report import result_of
        started = time.perf_counter()
        self.policy.start(self)
        self._offer()
        handlers = (self._on_task_done, self._on_worker_back, lambda _: self.policy.on_round(self), self._on_begin,
                    self._on_submitted)
        while self.events or self.flows.active:
            if self.flows.next_at < (self.events[0][0] if self.events else math.inf):
                self.now = self.flows.next_at
                for t in self.flows.finished(self.now):
                    self._read_done(t)
            else:
                at, _, kind, obj = heapq.heappop(self.events)
                self.now = at
                handlers[kind](obj)
            if self.new_ready:
                self._offer()
        return result_of(self, time.perf_counter() - started)

    def push_event(self, at: float, kind: int, obj) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, obj))

    def charge_daemon(self, seconds: float) -> float:
        """The submitter's serial time: returns when work charged now ends."""
        self.daemon_free_at = max(self.now, self.daemon_free_at) + seconds
        self.daemon_seconds += seconds
        return self.daemon_free_at

    # ----------------------------------------------------------------- groups

    def plan(self, g: Group) -> bool:
        """Plan ``g`` for the modelled cluster; a group that can never fit fails here."""
        try:
            g.plan = self.plans.plan(g.spec, self.estimator)
        except DoesNotFit as exc:
            self.group_ended(g, False, f"DoesNotFit: {exc}")
            return False
        return True

    def plan_and_launch(self, g: Group) -> None:
        if self.plan(g):
            self.launch(g)

    def launch(self, g: Group) -> None:
        """Submit the group's current plan: pay for it, build its tasks; leaves are ready once paid."""
        plan = g.plan
        demand = min(plan.task_peak_bytes, self.cluster.resource_bytes) if self.policy.restricted else 0
        g.attempts += 1
        run = Run(g, plan, f"{g.name}#{g.attempts}", demand, next(self.order))
        g.run, g.launched_at = run, self.now
        self.in_flight += 1
        run.tasks = self._build_tasks(run)
        cost = self.cal.daemon.group_cost_seconds(plan.n_files, len(run.tasks))
        self.push_event(self.charge_daemon(cost), EV_SUBMITTED, run)

    def _on_submitted(self, run: Run) -> None:
        if run.state != RUNNING:
            return
        for t in run.tasks:
            if not t.inputs and t.state == PENDING:
                self._push_ready(t)

    def _build_tasks(self, run: Run) -> list[Task]:
        plan, spec = run.plan, run.group.spec
        times, scale = self.cal.times(plan.strategy), self.cal.cpu_scale(spec.file)
        _, raw = plan_peaks(plan, self.estimator)
        leaves, levels, _ = tree_shape(plan)
        lo, hi = self.scenario.peak_noise
        noise = iter(self.rng.uniform(lo, hi, len(leaves) + sum(map(len, levels)) + 1).tolist()
                     if hi > lo else itertools.repeat(lo))
        comb, final_s = times.combine_seconds_per_input * scale, times.final_seconds * scale
        per_file_s = times.leaf_seconds_per_file * scale + self.cluster.storage.request_latency_seconds
        bytes_per_file = spec.input_bytes / spec.n_files
        if len(leaves) == 1:  # graphs.build runs a one-leaf group as one task: leaf, then final
            return [Task(run, 0, 0, [], leaves[0] * per_file_s + comb + final_s,
                         int(max(raw.leaf_bytes, raw.final_bytes) * next(noise)), 0, spec.input_bytes)]
        level = [Task(run, 0, i, [], files * per_file_s, int(raw.leaf_bytes * next(noise)), raw.result_bytes,
                      round(files * bytes_per_file)) for i, files in enumerate(leaves)]
        tasks, fan_in = list(level), max(2, plan.fan_in)
        for depth, widths in enumerate(levels, start=1):
            level = [self._parent(run, depth, i, level[i * fan_in:i * fan_in + k], k * comb,
                                  int(raw.combine_bytes * next(noise)), raw.result_bytes)
                     for i, k in enumerate(widths)]
            tasks.extend(level)
        tasks.append(self._parent(run, len(levels) + 1, 0, level, len(level) * comb + final_s,
                                  int(raw.final_bytes * next(noise)), 0))
        return tasks

    @staticmethod
    def _parent(run, depth, index, inputs, duration, peak, result) -> Task:
        t = Task(run, depth, index, inputs, duration, peak, result)
        for i in inputs:
            i.consumer = t
        return t

    def group_ended(self, g: Group, ok: bool, error: str = "") -> None:
        g.ok, g.error, g.ended_at = ok, error, self.now
        if g.first_start is None and ok:
            g.first_start = self.now

    def _run_done(self, run: Run) -> None:
        run.state = DONE
        self.in_flight -= 1
        self.group_ended(run.group, True)
        self.policy.on_run_done(self, run)
        self.policy.after_group_change(self)

    def _run_failed(self, run: Run, reason: str) -> None:
        """KilledWorker: cancel the run; the policy may re-plan and retry it."""
        run.state = CANCELLED
        self.in_flight -= 1
        for t in run.tasks:
            if t.state == DONE:
                self._free_result(t)
            if t.state in (PENDING, READY, LOST):
                t.state = CANCELLED
        if not self.policy.on_run_failed(self, run):
            self.group_ended(run.group, False, reason)
        self.policy.after_group_change(self)

    # ----------------------------------------------------------------- the task scheduler

    def _push_ready(self, t: Task) -> None:
        t.state = READY
        t.version += 1
        run = t.run
        heapq.heappush(self.buckets.setdefault(run.demand, []), (run.order, -t.depth, t.index, t.version, t))
        self.new_ready = True

    def _pop_ready(self, limit: int) -> Task | None:
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

    def _start(self, t: Task, w: int) -> None:
        run = t.run
        self.free_threads[w] -= 1
        self.free_res[w] -= run.demand
        if not self.free_threads[w]:
            self.idle.discard(w)
        start = max(self.now, self.sched_free_at) + self.cal.daemon.scheduler_seconds_per_task
        self.sched_free_at = start
        t.state, t.worker, t.inc, t.started = RUNNING, w, self.incarnation[w], start
        if run.group.first_start is None:
            run.group.first_start = start
        self.running[w][t] = None
        self.tasks_run += 1
        self.push_event(start, EV_BEGIN, t)
        self._add_bytes(w, t.peak, running=True)

    def _lost(self, t: Task) -> bool:
        return t.state != RUNNING or t.inc != self.incarnation[t.worker]

    def _on_begin(self, t: Task) -> None:
        """The task runs on its worker: its read first, if it has one."""
        if self._lost(t):
            return
        if t.read_bytes and self.limited_storage:
            self.flows.add(self.now, t.worker, t.read_bytes, t)
        else:
            self._read_done(t)

    def _read_done(self, t: Task) -> None:
        if self._lost(t):
            return
        self.bytes_read += t.read_bytes
        self.push_event(self.now + t.duration, EV_TASK_DONE, t)

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

    def _on_task_done(self, t: Task) -> None:
        w = t.worker
        if self._lost(t):
            return  # lost with its worker
        del self.running[w][t]
        self.free_threads[w] += 1
        self.free_res[w] += t.run.demand
        self.busy += self.now - t.started
        self._add_bytes(w, -t.peak, running=True)
        if t.run.state != RUNNING:  # its group failed meanwhile: the result is dropped
            t.state = CANCELLED
        else:
            self._task_succeeded(t, w)
        self._fill(w)

    def _task_succeeded(self, t: Task, w: int) -> None:
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

    def _free_result(self, t: Task) -> None:
        if t.state != DONE:
            return
        t.state = CONSUMED
        del self.results[t.worker][t]
        self._add_bytes(t.worker, -t.result, running=False)

    # ----------------------------------------------------------------- killed workers

    def _kill(self, w: int) -> None:
        """The nanny kills ``w``: its running tasks, reads and held results are lost."""
        self.kills += 1
        lost_running, lost_results = list(self.running[w]), list(self.results[w])
        self.task_bytes -= self.running_bytes[w] + self.result_bytes[w]
        if self.paused[w]:
            self.paused_seconds += self.now - self.paused_since[w]
        self.flows.drop_node(self.now, w)
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
        self.push_event(self.now + self.cal.restart_seconds, EV_WORKER_BACK, w)

    def _recover_running(self, t: Task) -> None:
        if t.run.state != RUNNING:
            return
        if t.failures > self.cluster.allowed_failures:
            self._run_failed(t.run, f"KilledWorker: a task was running on {t.failures} workers that died")
        else:
            self._recompute(t)

    def _recover_result(self, t: Task) -> None:
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

    def _recompute(self, t: Task) -> None:
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
        self.policy.on_worker_back(self)


def simulate(estate: Estate, cluster: ModelCluster, scenario: Scenario,
             calibration: Calibration = Calibration()):
    """Run one batch of ``estate``'s groups under ``scenario`` on ``cluster``."""
    return Simulation(estate, cluster, scenario, calibration).run()

"""The four ways to run a batch (all groups arrive at time 0).

* ``all-at-once`` (a): every group submitted at once, tasks placed by threads only;
* ``fixed-pool`` (b): at most ``pool_size`` groups in flight (the seed's thread pool);
* ``resources`` (c): every group at once, each task restricted by the MEMORY resource;
* ``throttler`` (d): admission by the real :func:`throttler.admission.choose` over a
  :class:`~throttler.cluster.ClusterSnapshot` of the simulated state, with MEMORY
  restrictions, the ledger, and the daemon's re-plan after a kill.

Admission rounds (d) run when capacity changes (a group ends, a worker
returns) at most every ``admission_interval_seconds``; a round considers the
first ``admission_window`` waiting groups in queue order, as the daemon holds
a bounded number of claimed requests, and admits every group ``choose``
admits; a round that admitted every group it considered refills the window
and runs again at once. Each round costs the daemon its calibrated time. A
group's wait counts from its entry into that window. Snapshots are exact (no
heartbeat lag): the ledger covers that lag in the real daemon.
"""

from __future__ import annotations

import math

from throttler.admission import policy as admission
from throttler.admission.ledger import Ledger, Reservation
from throttler.cluster.snapshot import ClusterSnapshot, WorkerView
from throttler.errors import DoesNotFit
from throttler.planning import planner


class Policy:
    """Hooks the engine calls; the base submits every group at once (a)."""

    restricted = False  #: tasks need MEMORY of their worker

    def start(self, sim) -> None:
        for g in list(sim.queue):
            sim.plan_and_launch(g)
        sim.queue.clear()

    def after_group_change(self, sim) -> None:
        pass

    def on_run_done(self, sim, run) -> None:
        pass

    def on_run_failed(self, sim, run) -> bool:
        """True if the group was queued again."""
        return False

    def on_worker_back(self, sim) -> None:
        pass

    def on_round(self, sim) -> None:
        pass


class Resources(Policy):
    restricted = True


class FixedPool(Policy):
    def start(self, sim) -> None:
        self.after_group_change(sim)

    def after_group_change(self, sim) -> None:
        while sim.in_flight < sim.scenario.pool_size and sim.queue:
            sim.plan_and_launch(sim.queue.popleft())
        sim.new_ready = True


class Throttler(Policy):
    restricted = True

    def __init__(self, scenario):
        self.window: list = []
        self.ledger = Ledger()
        self.admission = admission.AdmissionPolicy(scenario.memory_fraction, scenario.max_head_wait_seconds)
        self.round_pending, self.last_round = False, -math.inf
        self.rounds, self.peak_reserved = 0, 0

    def start(self, sim) -> None:
        self.request_round(sim)

    def after_group_change(self, sim) -> None:
        self.request_round(sim)

    on_worker_back = after_group_change

    def request_round(self, sim) -> None:
        if not self.round_pending:
            self.round_pending = True
            at = max(sim.now, self.last_round + sim.scenario.admission_interval_seconds)
            sim.push_event(at, 2, None)  # engine.EV_ROUND

    def on_run_done(self, sim, run) -> None:
        self.ledger.release(run.key)
        peak = max(t.peak for t in run.tasks)
        sim.estimator.observe(run.plan.strategy, run.plan.task_peak_bytes, peak, run.plan.estimate_factor)

    def on_run_failed(self, sim, run) -> bool:
        """What the daemon does after KilledWorker: learn, re-plan, wait, queue again."""
        self.ledger.release(run.key)
        g, plan = run.group, run.plan
        if g.attempts >= sim.scenario.max_group_attempts:
            return False
        sim.estimator.observe(plan.strategy, plan.task_peak_bytes, 2 * plan.task_peak_bytes, plan.estimate_factor)
        try:
            g.plan = planner.replan_after_oom(plan, sim.shape, sim.estimator,
                                              memory_fraction=sim.scenario.memory_fraction)
        except DoesNotFit as exc:
            sim.group_ended(g, False, f"DoesNotFit: {exc}")
            return True
        g.enqueued_at = sim.now
        g.not_before = sim.now + min(30.0, 2.0 ** (g.attempts - 1))  # the daemon's backoff, no jitter
        self.window.append(g)
        sim.push_event(g.not_before, 2, None)
        return True

    def _refill(self, sim) -> None:
        while len(self.window) < sim.scenario.admission_window and sim.queue:
            g = sim.queue.popleft()
            if sim.plan(g):
                g.enqueued_at = sim.now
                self.window.append(g)

    def on_round(self, sim) -> None:
        """One admission round: the real :func:`admission.choose` over the window."""
        self.round_pending, self.last_round = False, sim.now
        self.rounds += 1
        self._refill(sim)
        ready = [g for g in self.window if g.not_before <= sim.now]
        if not ready:
            return
        entries = [admission.QueueEntry(g.plan, 0, g.enqueued_at, f"{g.name}#{g.attempts + 1}") for g in ready]
        sim.charge_daemon(sim.cal.daemon.round_cost_seconds(len(entries)))
        choices = admission.choose(snapshot(sim), self.ledger.items(), entries, sim.now, self.admission)
        by_key = {e.reservation_key: g for e, g in zip(entries, ready)}
        taken = set()
        for choice in choices:
            g = by_key[choice.entry.reservation_key]
            taken.add(g.name)
            if choice.decision.admit:
                self._reserve(sim, choice.entry)
                sim.launch(g)
            else:
                sim.group_ended(g, False, f"DoesNotFit: {choice.decision.reason}")
        self.window = [g for g in self.window if g.name not in taken]
        if any(c.decision.admit for c in choices):  # admits only add within a round: its end is its peak
            counted = admission.Tally.of(self.ledger.items()).total_bytes(sim.cluster.threads)
            self.peak_reserved = max(self.peak_reserved, counted)  # as admission counts it (capped)
        if len(taken) == len(ready) and sim.queue:  # the window, not memory, was the limit: go on
            self.round_pending = True
            sim.push_event(sim.now, 2, None)

    def _reserve(self, sim, entry: admission.QueueEntry) -> None:
        plan = entry.plan
        self.ledger.reserve(Reservation(plan.group, entry.reservation_key, plan.group_peak_bytes,
                                                  plan.task_peak_bytes, sim.now, plan.running_bytes))


def snapshot(sim) -> ClusterSnapshot:
    """The modelled cluster as :func:`throttler.cluster.read_snapshot` would see it (exact)."""
    c, base = sim.cluster, sim.cal.worker_baseline_bytes
    workers = tuple(
        WorkerView(sim.names[w], f"sim://{sim.names[w]}", "paused" if sim.paused[w] else "running",
                   c.threads_per_worker, c.memory_limit_bytes,
                   process_bytes=base + sim.running_bytes[w] + sim.result_bytes[w],
                   managed_bytes=sim.result_bytes[w], unmanaged_old_bytes=base,
                   memory_budget_bytes=int(c.resource_bytes),
                   used_budget_bytes=float(c.resource_bytes - sim.free_res[w]))
        for w in range(c.n_workers) if sim.up[w])
    return ClusterSnapshot(workers, sim.now)


def make(scenario) -> Policy:
    if scenario.policy == "throttler":
        return Throttler(scenario)
    return {"all-at-once": Policy, "fixed-pool": FixedPool, "resources": Resources}[scenario.policy]()

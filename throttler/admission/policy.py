"""Admission: may this plan start now? A pure policy over a cluster snapshot.

No I/O and no clock: the caller passes the snapshot, its own reservations and
the time. The submitter thread carries a decision out under its lock (reserve
in the :class:`Ledger`, then submit).

Memory accounting. Only running workers count (a paused worker starts no
task; a closing one is leaving). Each contributes ``memory_limit x
memory_fraction`` to the capacity. Used memory is
``max(sum process, sum unmanaged_old + reserved)``: a just-submitted group
does not show in heartbeats for a second or two, so its reservation stands in
for it; once its memory shows up in process memory, the larger of the two
counts it once, not twice. (Working memory of a task running longer than
``distributed.worker.memory.recent-to-old-time``, 30 s, turns into
unmanaged_old and is then counted twice: the error is on the safe side.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from throttler.admission.ledger import Reservation
from throttler.cluster.snapshot import (
    WORKER_BASELINE_BYTES,
    ClusterSnapshot,
    WorkerView,
)
from throttler.config import DEFAULTS
from throttler.planning.plan import Plan
from throttler.units import format_bytes

#: Default share of each worker's memory_limit that admitted work may fill
#: (the one value is in throttler.config).
DEFAULT_MEMORY_FRACTION = DEFAULTS.memory_fraction

#: How long the head of the queue may be overtaken by smaller groups before
#: nothing new starts until it fits.
DEFAULT_MAX_HEAD_WAIT_SECONDS = DEFAULTS.max_head_wait_seconds

#: How many queued entries one round judges (queue order); the rest wait a round.
DEFAULT_WINDOW = 256


@dataclass(frozen=True)
class Decision:
    """The verdict on one candidate, with the figures behind it."""

    admit: bool
    reason: str
    free_bytes: int  #: capacity minus used (negative when over budget)
    needed_bytes: int  #: the candidate's group peak
    fatal: bool = False  #: the candidate can never run on this cluster


@dataclass(frozen=True)
class Budget:
    """One snapshot's figures, computed once per round (see :meth:`Budget.used_bytes`)."""

    capacity_bytes: int  #: running workers' limits (as the worker plugin sized them) x fraction
    shown_bytes: int  #: what the workers show
    own_bytes: int  #: the workers' own memory, to which reservations add
    largest_task_budget_bytes: int  #: the largest running worker's solo budget: one task alone (0: none)
    has_running: bool
    threads: int = 0  #: of the running workers: at most this many tasks run at once

    @classmethod
    def of(cls, snapshot: ClusterSnapshot, memory_fraction: float) -> "Budget":
        running = snapshot.running_workers
        shown, own = _shown_and_own(running)
        return cls(sum(int(w.budget_limit_bytes * memory_fraction) for w in running), shown, own,
                   max((w.solo_budget() for w in running), default=0),
                   bool(running), sum(w.nthreads for w in running))

    def used_bytes(self, tally: "Tally") -> int:
        """The larger of what the workers show and what our reservations promise on
        top of the workers' own memory (see :func:`_shown_and_own`)."""
        return max(self.shown_bytes, self.own_bytes + tally.total_bytes(self.threads))

    def free_bytes(self, tally: "Tally") -> int:
        return self.capacity_bytes - self.used_bytes(tally)


@dataclass(frozen=True)
class Tally:
    """Reservations summed for one round.

    Each group reserves what its running tasks may hold plus the partial
    results waiting for a merge. The running parts are capped together: the
    cluster's threads run at most that many tasks at once, each no larger
    than the largest task reserved. Without the cap every group would
    reserve as if it had every thread to itself (measured in the simulation:
    99% of capacity reserved while 41% was held, utilisation 75%).
    """

    running_bytes: int = 0
    waiting_bytes: int = 0
    largest_task_bytes: int = 0
    count: int = 0

    @classmethod
    def of(cls, reserved: Iterable[Reservation]) -> "Tally":
        """The sum of :meth:`plus` over ``reserved``, in one loop (rounds see thousands of reservations)."""
        running = waiting = largest = count = 0
        for r in reserved:
            part = min(r.running_bytes, r.group_peak_bytes)
            if part and r.task_peak_bytes > largest:
                largest = r.task_peak_bytes
            running += part
            waiting += r.group_peak_bytes - part
            count += 1
        return cls(running, waiting, largest, count)

    def plus(self, group_peak_bytes: int, running_bytes: int, task_peak_bytes: int) -> "Tally":
        """Add one group; ``running_bytes`` 0 means its peak is not split (counted uncapped)."""
        running = min(running_bytes, group_peak_bytes)
        largest = max(self.largest_task_bytes, task_peak_bytes) if running else self.largest_task_bytes
        return Tally(self.running_bytes + running, self.waiting_bytes + group_peak_bytes - running,
                     largest, self.count + 1)

    def plus_plan(self, plan: Plan) -> "Tally":
        return self.plus(plan.group_peak_bytes, plan.running_bytes, plan.task_peak_bytes)

    def total_bytes(self, threads: int) -> int:
        running = self.running_bytes if threads <= 0 else min(self.running_bytes, threads * self.largest_task_bytes)
        return running + self.waiting_bytes


def decide(snapshot: ClusterSnapshot, reserved: list[Reservation], candidate: Plan, *,
           memory_fraction: float = DEFAULT_MEMORY_FRACTION, now_seconds: float,
           head_waiting_since_seconds: float | None = None, is_head: bool = True,
           max_backfill_delay_seconds: float = DEFAULT_MAX_HEAD_WAIT_SECONDS) -> Decision:
    """Admit ``candidate`` now, or say why it waits (or can never run).

    A candidate that is not the head of the queue waits once the head has
    waited ``max_backfill_delay_seconds`` (backfill is closed). A candidate
    that does not fit the free memory still runs when nothing of ours is
    reserved, so no group waits forever (see :func:`_alone`).
    """
    backfill_closed = (not is_head and head_waiting_since_seconds is not None
                       and now_seconds - head_waiting_since_seconds >= max_backfill_delay_seconds)
    return _verdict(Budget.of(snapshot, memory_fraction), _empty_budget(snapshot, memory_fraction),
                    Tally.of(reserved), candidate, backfill_closed, memory_fraction)


def _verdict(budget: Budget, empty_budget: int | None, tally: Tally, candidate: Plan,
             backfill_closed: bool, memory_fraction: float) -> Decision:
    """The one verdict of :func:`decide` and :func:`choose`: fatal when the candidate's
    largest task fits no worker even empty (``empty_budget``), else :func:`_judge`."""
    fatal = "" if empty_budget is None else _never_fits_budget(empty_budget, candidate, memory_fraction)
    if fatal:
        return Decision(False, fatal, 0, candidate.group_peak_bytes, fatal=True)
    return _judge(budget, tally, candidate, backfill_closed)


def _judge(budget: Budget, tally: Tally, candidate: Plan, backfill_closed: bool) -> Decision:
    """The verdict on a candidate that can fit some worker, given the round's budget."""
    needed = candidate.group_peak_bytes
    if not budget.has_running:
        return Decision(False, "no running workers", 0, needed)
    free = budget.free_bytes(tally)
    if backfill_closed:
        return Decision(False, "backfill closed: the head of the queue has waited too long", free, needed)
    if candidate.task_peak_bytes > budget.largest_task_budget_bytes:
        return Decision(False, f"largest task ({format_bytes(candidate.task_peak_bytes)}) fits no running worker now",
                        free, needed)
    increment = tally.plus_plan(candidate).total_bytes(budget.threads) - tally.total_bytes(budget.threads)
    if increment <= free:
        return Decision(True, f"fits: needs {format_bytes(increment)} more (group peak {format_bytes(needed)}), "
                              f"{format_bytes(free)} free", free, needed)
    return _alone(tally.count > 0, candidate, budget.capacity_bytes, free)


def _shown_and_own(running: tuple[WorkerView, ...]) -> tuple[int, int]:
    """(memory the workers show, the workers' own memory), as admission counts them.

    A busy worker counts its whole process memory, and its old unmanaged
    memory as its own. An idle worker counts its managed data plus at most the
    import baseline and the code it reports loaded since (numba: 112 MiB that the
    baseline alone left uncounted, enough to pause a 600 MB worker): the rest is allocator pages kept from earlier tasks,
    which the next task reuses (measured: a worker idle at 66 MB stays near
    200 MB after a pandas task, ``malloc_trim`` or not). Reservations add to
    the workers' own memory: they cover the lag between a submit and its
    memory showing up in the heartbeats, without counting it twice once it does.
    """
    shown = own = 0
    for w in running:
        if w.processing:
            shown += w.process_bytes
            own += w.unmanaged_old_bytes
        else:
            idle_own = min(w.process_bytes, WORKER_BASELINE_BYTES + w.resident_code_bytes)
            shown += min(w.process_bytes, idle_own + w.managed_bytes)
            own += idle_own
    return shown, own


def _empty_budget(snapshot: ClusterSnapshot, memory_fraction: float) -> int | None:
    """What the largest worker, running or not, allows one task when empty (None: no workers)."""
    return max((w.solo_budget() for w in snapshot.workers), default=None)


def _never_fits_budget(budget: int, candidate: Plan, memory_fraction: float) -> str:
    """Why the candidate's largest task fits no worker even empty ("" when it fits one)."""
    if candidate.task_peak_bytes <= budget:
        return ""
    return (f"does not fit: the largest task needs {format_bytes(candidate.task_peak_bytes)} but the largest "
            f"worker allows {format_bytes(budget)} for one task running alone (below Dask's pause threshold)")


def _alone(anything_reserved: bool, candidate: Plan, capacity: int, free: int) -> Decision:
    """A group that does not fit the free memory runs alone rather than wait forever.

    With nothing of ours reserved, waiting frees nothing of ours: the memory
    in use is the workers' own (allocator pages kept from earlier tasks,
    which the next task reuses) or someone else's, and a group larger than
    the cluster (planned for a stale shape) would never fit at all. Each of
    its tasks fits a running worker (checked before); the MEMORY resource
    keeps each worker to what its tasks may hold, and Dask's pause threshold
    guards the rest.
    """
    needed = candidate.group_peak_bytes
    if anything_reserved:
        wait = "waits to run alone" if needed > capacity else "waits for memory"
        return Decision(False, f"{wait}: needs {format_bytes(needed)}, {format_bytes(free)} free of "
                               f"{format_bytes(capacity)}", free, needed)
    return Decision(True, f"runs alone: needs {format_bytes(needed)}, {format_bytes(free)} free of "
                          f"{format_bytes(capacity)}; nothing else of ours runs", free, needed)


# --------------------------------------------------------------------------- the queue


@dataclass(frozen=True)
class QueueEntry:
    """A planned group waiting for admission."""

    plan: Plan
    priority: int = 0  #: higher first
    enqueued_at_seconds: float = 0.0
    key: str = ""  #: the reservation key ("" means the group name)

    @property
    def reservation_key(self) -> str:
        return self.key or self.plan.group


@dataclass(frozen=True)
class AdmissionPolicy:
    """The tunables of :func:`choose`."""

    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    max_head_wait_seconds: float = DEFAULT_MAX_HEAD_WAIT_SECONDS
    window: int = DEFAULT_WINDOW  #: entries judged per round, in queue order


@dataclass(frozen=True)
class Choice:
    """A decision about one queue entry."""

    entry: QueueEntry
    decision: Decision

    @property
    def plan(self) -> Plan:
        return self.entry.plan


def queue_order(queue: Iterable[QueueEntry]) -> list[QueueEntry]:
    """Priority first (higher first), then the order of arrival."""
    return sorted(queue, key=lambda e: (-e.priority, e.enqueued_at_seconds))


def choose(snapshot: ClusterSnapshot, reserved: list[Reservation], queue: list[QueueEntry],
           now_seconds: float, policy: AdmissionPolicy = AdmissionPolicy()) -> list[Choice]:
    """One admission round: every entry to admit now, and every fatal one.

    The head is the first entry, in queue order, that waits. Smaller entries
    behind it may start (backfill) until the head has waited
    ``policy.max_head_wait_seconds`` since it was enqueued; then nothing new
    starts until the head fits, so it starts within a bounded time. A fatal
    entry never becomes the head. Admits are reserved virtually as the round
    goes, so one round never over-admits. The snapshot's figures are computed
    once; only the first ``policy.window`` entries in queue order are judged
    (the rest wait for a later round), so a round costs O(workers + window).
    """
    budget = Budget.of(snapshot, policy.memory_fraction)
    empty_budget = _empty_budget(snapshot, policy.memory_fraction)
    tally = Tally.of(reserved)
    out: list[Choice] = []
    head: QueueEntry | None = None
    for entry in queue_order(queue)[:policy.window]:
        closed = head is not None and now_seconds - head.enqueued_at_seconds >= policy.max_head_wait_seconds
        decision = _verdict(budget, empty_budget, tally, entry.plan, closed, policy.memory_fraction)
        if decision.fatal:
            out.append(Choice(entry, decision))
        elif decision.admit:
            tally = tally.plus_plan(entry.plan)
            out.append(Choice(entry, decision))
        elif head is None:
            head = entry
    return out

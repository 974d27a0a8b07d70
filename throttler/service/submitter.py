"""The submitter: planned groups wait here; admission rounds submit what fits.

One lock guards check, reserve and submit: it is held while a round chooses
over the waiting list and the ledger, reserves and calls ``client.compute``,
and never while the scheduler is read, metrics are set, lines are logged or
spool files move. Reading the snapshot outside the lock is safe because the
ledger, updated under it, covers memory that the snapshot does not show yet
(see :mod:`throttler.admission.policy`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from throttler.admission import policy as admission
from throttler.admission.ledger import Ledger, Reservation
from throttler.cluster.scheduler import read_snapshot
from throttler.errors import DoesNotFit
from throttler.service.jobs import RUNNING, WAITING, Job

log = logging.getLogger(__name__)


@dataclass
class Round:
    """What one admission round did: jobs submitted (with why) and jobs to fail or retry."""

    submitted: list[tuple[Job, str]] = field(default_factory=list)
    failures: list[tuple[Job, BaseException]] = field(default_factory=list)

    @property
    def progressed(self) -> bool:
        return bool(self.submitted or self.failures)


class Submitter:
    """Owns the waiting list, the reservation ledger and the submit lock."""

    def __init__(self, *, client: Callable, policy: Callable[[], admission.AdmissionPolicy],
                 resources: Callable, observe: Callable, clock: Callable[[], float]):
        self._client = client  #: () -> the current Client
        self._policy = policy  #: () -> the AdmissionPolicy of the current configuration
        self._resources = resources  #: (plan, snapshot) -> the resources= of a submission
        #: (snapshot) -> the snapshot to admit with: the cluster view keeps the newest and leaves out
        #: the workers withdrawn from our tasks
        self._observe = observe
        self._clock = clock
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self.changed = threading.Condition()  #: capacity or the waiting list changed
        self.stopped = threading.Event()

    def waiting_count(self) -> int:
        with self._lock:
            return len(self._waiting)

    def add(self, job: Job, max_waiting: int) -> bool:
        """Bounded hand-off: wait while ``max_waiting`` jobs wait; False once stopped."""
        with self.changed:
            while self.waiting_count() >= max_waiting and not self.stopped.is_set():
                self.changed.wait(0.5)
        with self._lock:
            if self.stopped.is_set():
                return False
            job.state = WAITING
            job.waiting_since_seconds = self._clock()
            self._waiting.append(job)
        self.notify()
        return True

    def take_all(self) -> list[Job]:
        """Empty the waiting list (shutdown); returns what waited."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        return waiting

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_for_change(self, timeout_seconds: float) -> None:
        with self.changed:
            self.changed.wait(timeout_seconds)

    def round(self) -> Round:
        """One admission round: read the scheduler, then check-reserve-submit under the lock."""
        done = Round()
        now = self._clock()
        with self._lock:
            ready = any(j.not_before_seconds <= now for j in self._waiting)
        if not ready or self.stopped.is_set():
            return done
        snapshot = self._observe(read_snapshot(self._client()))  # outside the lock: the ledger covers its lag
        with self._lock:  # the clock read again: a job handed off during the read must not wait less than 0 s
            self._admit(snapshot, self._clock(), done)
        if done.progressed:
            self.notify()  # builders blocked on the hand-off bound
        return done

    def _admit(self, snapshot, now: float, done: Round) -> None:
        """Choose, reserve and submit (the caller holds the lock)."""
        ready = [j for j in self._waiting if j.not_before_seconds <= now]
        entries = [admission.QueueEntry(j.plan, j.priority, j.waiting_since_seconds, j.graph.token)
                   for j in ready]
        by_token = {j.graph.token: j for j in ready}
        for choice in admission.choose(snapshot, self.ledger.items(), entries, now, self._policy()):
            job = by_token[choice.entry.reservation_key]
            self._waiting.remove(job)
            if not choice.decision.admit:
                done.failures.append((job, DoesNotFit(choice.decision.reason)))
                continue
            try:
                self._submit(job, snapshot, now)
            except Exception as exc:  # noqa: BLE001 - e.g. the scheduler went away
                done.failures.append((job, exc))
            else:
                done.submitted.append((job, choice.decision.reason))

    def _submit(self, job: Job, snapshot, now: float) -> None:
        plan = job.plan
        self.ledger.reserve(Reservation(job.group, job.graph.token, plan.group_peak_bytes,
                                        plan.task_peak_bytes, now, plan.running_bytes))
        job.reservation_key = job.graph.token
        try:
            job.future = self._client().compute(job.graph.final, resources=self._resources(plan, snapshot))
        except Exception:
            self.ledger.release(job.reservation_key)
            job.reservation_key = None
            raise
        job.admission_wait_seconds += now - job.waiting_since_seconds
        job.submitted_at_seconds = now
        job.state = RUNNING

    def release(self, job: Job) -> None:
        """Drop a finished job's reservation."""
        if job.reservation_key is not None:
            self.ledger.release(job.reservation_key)
        self.notify()

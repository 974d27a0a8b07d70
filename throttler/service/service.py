"""The daemon: spool intake, a graph-builder pool, a submitter pool, completions.

Flow of one group::

    incoming/ --claim--> [builder pool] plan + graph --bounded hand-off--> waiting
    waiting --[submitter pool: snapshot, then under ONE lock: decide, reserve, submit]--> running
    running --future done--> [completion thread] record, release, learn / retry

Admission is :func:`throttler.admission.policy.choose` (pure), carried out by
:class:`throttler.service.submitter.Submitter`, which owns the waiting list,
the ledger and the lock. What a failure means is
:func:`throttler.service.outcome.decide` (pure); this module carries it out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from distributed.scheduler import KilledWorker

from throttler.admission import policy as admission
from throttler.cluster import worker_deaths, worker_memory, worker_settings
from throttler.cluster.scheduler import task_restriction
from throttler.cluster.snapshot import WORKER_BASELINE_BYTES
from throttler.config import Config
from throttler.errors import NoWorkers
from throttler.ops.progress import ProgressTracker
from throttler.ops.status import StatusReporter
from throttler.planning import planner
from throttler.service import incremental_run
from throttler.service import outcome as retries
from throttler.service.jobs import PLANNING, QUEUED, RUNNING, STATES, Job
from throttler.service.records import done_record, failed_record, unchanged_record
from throttler.service.submitter import Submitter
from throttler.units import count_of
from throttler.worker import graphs
from throttler.worker.output import output_path_for, sweep_temporaries

log = logging.getLogger(__name__)

#: how often a group planned while the cluster has no worker tries again (no attempt used)
NO_WORKERS_RETRY_SECONDS = 1.0

#: tasks estimated below this share of a worker's solo budget teach the estimator nothing
LEARN_MIN_SHARE_OF_SOLO = 0.25

#: how often "cannot read the scheduler" is logged while it stays away
UNREACHABLE_WARNING_SECONDS = 10.0

#: how long :meth:`Service.abandon` waits for each of its threads to see the stop
ABANDON_JOIN_SECONDS = 2.0


class Service:
    """The long-running service; :meth:`step` is one iteration of the main loop."""

    def __init__(self, config: Config, client, *, spool, catalog, estimator, metrics, notifier,
                 clock=time.monotonic, reconnect=None):
        self.config = config
        self.client = client
        self.reconnect = reconnect  #: () -> new Client, for an external scheduler
        self._reconnect_at = 0.0
        self._unreachable_warned_at = float("-inf")
        self._reconnect_attempts = 0
        self.spool, self.catalog, self.estimator = spool, catalog, estimator
        self.metrics, self.notifier, self.clock = metrics, notifier, clock
        self.submitter = Submitter(client=lambda: self.client, policy=self._admission_policy,
                                   resources=self._resources, observe=self._observe_snapshot, clock=clock)
        self.ledger = self.submitter.ledger
        self.progress = ProgressTracker()
        self._jobs: dict[str, Job] = {}  #: live jobs by group
        self._jobs_lock = threading.Lock()
        self._delayed: list[Job] = []  #: retries waiting out their backoff (guarded by _jobs_lock)
        self._completions: queue.Queue = queue.Queue()
        self._busy = {"builder": 0, "submitter": 0}
        self._stop_intake = threading.Event()
        self._stop_submitting = self.submitter.stopped
        self._abandoned = threading.Event()  #: set by :meth:`abandon`: nothing more is recorded or retried
        self._threads: list[threading.Thread] = []
        self._builders: ThreadPoolExecutor | None = None
        self._pool_size = {"builder": 0, "submitter": 0}
        self._drain_deadline_seconds: float | None = None  #: set when :meth:`drain` starts (clock time)
        self.status = StatusReporter(self)
        self.on_capacity = None  #: called when a run ends (the daemon wakes its main loop to claim more)
        self.on_finished = None  #: called with (kind, record) once a run's record is written
        spool.on_refused = metrics.request_rejected

    # ----------------------------------------------------------------- sizes

    def pool_sizes(self) -> tuple[int, int]:
        """(builder threads, submitter threads): configured, else derived from the cluster."""
        threads = max(1, self.status.last_threads or 2)
        builders = self.config.builder_threads or min(8, max(2, threads // 2))
        submitters = self.config.submitter_threads or 2
        return builders, submitters

    def max_waiting(self) -> int:
        """Planned groups waiting for admission at most (builders block beyond it)."""
        return max(8, 2 * max(1, self.status.last_threads or 2))

    def max_live_jobs(self) -> int:
        """Claims held at once: enough to keep the cluster busy, bounded so a flood stays on disk."""
        return max(16, 4 * max(1, self.status.last_threads or 2))

    # ----------------------------------------------------------------- start / stop

    def start(self) -> None:
        """Start the pools and the completion thread (the caller runs :meth:`step`)."""
        self._prepare_cluster(self.client)
        self.status.shape()  # first snapshot: pool sizes derive from the cluster
        builders, submitters = self.pool_sizes()
        self._builders = ThreadPoolExecutor(builders, thread_name_prefix="throttler-builder")
        self._pool_size = {"builder": builders, "submitter": submitters}
        for i in range(submitters):
            self._spawn(self._submitter_loop, f"throttler-submitter-{i}")
        self._spawn(self._completion_loop, "throttler-completions")
        log.info("service started: %d builder threads, %d submitter threads", builders, submitters)

    def _prepare_cluster(self, client) -> None:
        """Give every worker, present and future, the daemon's memory resources; record
        why workers die; receive the leaves' progress (again after a reconnect)."""
        worker_memory.register(client, share=self.config.memory_fraction,
                               assumed_limit_bytes=self.config.assumed_worker_memory_bytes or None)
        worker_deaths.register(client)
        worker_settings.register(client, self.config)
        self.progress.subscribe(client)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def drain(self, timeout_seconds: float) -> None:
        """Ordered shutdown: stop intake, stop admitting, give back unstarted work,
        let running groups finish within ``timeout_seconds``, give back the rest."""
        deadline = self.clock() + timeout_seconds
        self._drain_deadline_seconds = deadline
        log.info("shutdown 1/4: intake stopped")
        self._stop_intake.set()
        self._refresh_status_draining(force=True)  # ``throttler status`` says draining at once
        self._stop_submitting.set()  # before waiting for the builders: one blocked handing off a group wakes
        self._notify()
        log.info("shutdown 2/4: admission stopped")
        if self._builders is not None:
            self._builders.shutdown(wait=True, cancel_futures=True)  # a group planned now is given back
        released = self._release_unstarted()
        log.info("shutdown 3/4: %d unstarted group(s) put back in incoming/", released)
        self._wait_for_running(deadline)
        left = self._release_running()
        log.info("shutdown 4/4: %d running group(s) left at the deadline, put back", left)
        self._completions.put(None)
        self.estimator.save()

    def _wait_for_running(self, deadline_seconds: float) -> None:
        """Let running groups finish until ``deadline_seconds`` (clock time).

        The main loop no longer runs, so the status file is rewritten here (at
        most once a second, without reading the scheduler: a scheduler that is
        away must not push the drain past its deadline); otherwise ``throttler
        status`` would call a draining daemon dead once the file grew stale.
        """
        while self.running_count() and self.clock() < deadline_seconds:
            self._refresh_status_draining()
            time.sleep(0.1)

    def _refresh_status_draining(self, force: bool = False) -> None:
        """Rewrite the status file during the drain; a failure is logged, never ends the drain early."""
        try:
            self.status.refresh(force=force, read_scheduler=False)
        except Exception:  # noqa: BLE001 - the drain must still give back what it holds
            log.exception("cannot refresh the status while draining")

    def draining(self) -> dict | None:
        """While :meth:`drain` runs: the groups still running and the seconds left to the deadline; else None."""
        deadline = self._drain_deadline_seconds
        if deadline is None:
            return None
        return {"running_groups": self.running_count(),
                "deadline_in_seconds": round(max(0.0, deadline - self.clock()), 1)}

    def abandon(self) -> list[str]:
        """Stop at once, keeping nothing (``throttler run`` interrupted); returns the groups not ended.

        Intake and admission stop; the running groups' futures are cancelled
        (a task already running on a worker finishes there, its result
        dropped; the output is only ever replaced whole); nothing is retried,
        recorded or given back to the spool, which the caller is about to
        remove. Unlike :meth:`drain` it does not wait for running groups.
        """
        self._abandoned.set()
        self._stop_intake.set()
        self._stop_submitting.set()
        self._notify()
        if self._builders is not None:
            self._builders.shutdown(wait=False, cancel_futures=True)
        self.submitter.take_all()
        with self._jobs_lock:
            jobs, self._delayed = list(self._jobs.values()), []
        running = [job for job in jobs if job.state == RUNNING]
        for job in running:
            future = job.future
            if future is not None:
                future.cancel()
        self._completions.put(None)
        for thread in self._threads:
            thread.join(ABANDON_JOIN_SECONDS)
        log.info("stopped at once: %d running group(s) cancelled, %d not started; nothing put back",
                 len(running), len(jobs) - len(running))
        return [job.group for job in jobs]

    def _release_unstarted(self) -> int:
        waiting = self.submitter.take_all()
        with self._jobs_lock:
            unstarted = [j for j in self._jobs.values() if j.state in (QUEUED, PLANNING)] + waiting
            self._delayed = []
        for job in unstarted:
            self._give_back(job)
        return len(unstarted)

    def _release_running(self) -> int:
        with self._jobs_lock:
            running = [j for j in self._jobs.values() if j.state == RUNNING]
        for job in running:
            if job.future is not None:
                job.future.cancel()
            self._give_back(job)
        return len(running)

    def _give_back(self, job: Job) -> None:
        """Return a job's requests to incoming/ (unless a completion closed it meanwhile)."""
        self._forget(job)
        try:
            self.spool.release(job.claim)
        except RuntimeError:
            log.info("%s finished while shutting down; nothing to give back", job.group)

    # ----------------------------------------------------------------- main loop step

    def step(self) -> None:
        """One iteration of the main loop: client health, intake, then status and metrics."""
        self.check_client()
        if not self._stop_intake.is_set():
            self._start_due()
            self.intake()
        self.status.refresh()

    def check_client(self) -> None:
        """Replace a client that gave up reconnecting (the scheduler was away too long).

        One connection attempt per call, spaced by the backoff, so the main loop
        keeps pinging the watchdog meanwhile. Futures of the old client were
        cancelled when the connection dropped; their groups are being retried
        as transient failures.
        """
        if self.reconnect is None or self.client.status not in ("closed", "closing"):
            return
        now = self.clock()
        if now < self._reconnect_at:
            return
        self._reconnect_attempts += 1
        try:
            client = self.reconnect()
        except Exception as exc:  # noqa: BLE001 - try again after the backoff
            self._reconnect_at = now + retries.backoff_seconds(self._reconnect_attempts)
            log.warning("scheduler unreachable (attempt %d): %s", self._reconnect_attempts, exc)
            return
        self.client = client
        self._prepare_cluster(client)
        self._reconnect_attempts = 0
        log.info("reconnected to the scheduler")

    def intake(self) -> int:
        """Claim queued requests (best first) while below the live-job bound."""
        claimed = 0
        for request in self.spool.scan():
            if self.live_count() >= self.max_live_jobs():
                break
            claim = self.spool.claim(request)
            if claim is None:
                continue
            job = Job(claim, request.group, claim.strategy or self.config.strategy,
                      claim.priority or 0, self.clock(), full=claim.full)
            with self._jobs_lock:
                self._jobs[job.group] = job
            self._count_requests(job)
            self._builders.submit(self._build, job)
            claimed += 1
        return claimed

    # ----------------------------------------------------------------- builder pool

    def _build(self, job: Job) -> None:
        """Resolve files, estimate, plan, build the graph; hand it to the submitters."""
        self._count_busy("builder", +1)
        try:
            job.state = PLANNING
            try:
                job.run = incremental_run.prepare(self.catalog.files(job.group), self.catalog.data_root,
                                                  output_path_for(self.config.output, job.group), job.full)
                if job.run.snapshot:
                    job.snapshot_names.add(os.path.basename(job.run.snapshot))
                if self._abandoned.is_set():
                    return
                if job.run.decision.unchanged:  # the previous output is the answer: nothing to run
                    return self._on_unchanged(job)
                job.plan = self._plan(job)
                job.graph = graphs.build(job.plan, job.run.target)
            except NoWorkers as exc:  # not the group's fault: no attempt used, plan again soon
                log.info("%s: %s", job.group, exc)
                self._rebuild(job, delay_seconds=NO_WORKERS_RETRY_SECONDS)
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                self._on_failure(job, exc)
                return
            self._hand_off(job)
        finally:
            self._count_busy("builder", -1)

    def _plan(self, job: Job):
        plan = planner.make_plan(job.group, list(job.run.files), job.strategy, self.status.shape(), self.estimator,
                                 attempt=1 + job.memory_failures, memory_fraction=self.config.memory_fraction,
                                 measured_task_peak_bytes=job.measured_task_peak_bytes,
                                 fan_in=self.config.fan_in)
        return dataclasses.replace(plan, run_alone=True) if job.run_alone else plan

    def _hand_off(self, job: Job) -> None:
        """Bounded hand-off: a builder waits while enough planned groups wait for admission."""
        if self._abandoned.is_set():
            return
        if not self.submitter.add(job, self.max_waiting()):
            self._give_back(job)

    # ----------------------------------------------------------------- submitter pool

    def _submitter_loop(self) -> None:
        while not self._stop_submitting.is_set():
            try:
                progressed = self.admit_step()
            except Exception:  # noqa: BLE001 - a broken round must not kill the pool
                log.exception("admission round failed")
                progressed = False
            if not progressed:
                self.submitter.wait_for_change(self.config.poll_seconds)

    def admit_step(self) -> bool:
        """One admission round; then, outside the lock, log, meter and watch what it submitted,
        and record or retry what it could not. True if any group was submitted or failed."""
        self._count_busy("submitter", +1)
        try:
            done = self.submitter.round()
        except Exception as exc:  # noqa: BLE001 - the scheduler is away: wait, say so now and then
            self._warn_unreachable(exc, self.clock())
            return False
        finally:
            self._count_busy("submitter", -1)
        for job, reason in done.submitted:
            self._submitted(job, reason)
        for job, exc in done.failures:
            self._on_failure(job, exc)
        return done.progressed

    def _admission_policy(self) -> admission.AdmissionPolicy:
        return admission.AdmissionPolicy(self.config.memory_fraction, self.config.max_head_wait_seconds)

    def _observe_snapshot(self, snapshot):
        return self.status.observe_snapshot(snapshot)

    def _warn_unreachable(self, exc: Exception, now: float) -> None:
        if now - self._unreachable_warned_at >= UNREACHABLE_WARNING_SECONDS:
            self._unreachable_warned_at = now
            log.warning("cannot read the scheduler, admission waits: %s", retries.describe(exc))

    def _submitted(self, job: Job, reason: str) -> None:
        plan = job.plan
        self.metrics.admission_wait(job.submitted_at_seconds - job.waiting_since_seconds)
        log.info("submitted %s (%s, %d files, %d leaves, reserves %.1f MiB): %s", job.group, plan.strategy,
                 plan.n_files, plan.n_leaf_tasks, plan.group_peak_bytes / 2**20, reason)
        job.future.add_done_callback(lambda _f, job=job: self._completions.put(job))

    def _resources(self, plan, snapshot) -> dict:
        """The daemon's own worker resources each task of ``plan`` asks (shared, or alone on its worker)."""
        return task_restriction(plan.task_peak_bytes, plan.run_alone, snapshot, self.config.memory_fraction)

    # ----------------------------------------------------------------- completions

    def _completion_loop(self) -> None:
        while True:
            job = self._completions.get()
            if job is None:
                return
            try:
                self.complete(job)
            except Exception:  # noqa: BLE001
                log.exception("completion of %s failed", job.group)

    def complete(self, job: Job) -> None:
        """Handle a finished future: release, then record or retry."""
        future, job.future = job.future, None
        if future is None or job.state != RUNNING or self._abandoned.is_set():
            return  # released during shutdown, or abandoned
        self.submitter.release(job)
        job.run_seconds = self.clock() - job.submitted_at_seconds
        token = job.graph.token
        try:
            self._record_outcome(job, future)
        finally:  # only now: until the job leaves RUNNING, status shows its progress, not zero
            self.progress.forget(token)

    def _record_outcome(self, job: Job, future) -> None:
        try:
            summary = future.result()
        except BaseException as exc:  # noqa: BLE001 - classified
            self._on_failure(job, exc)
            return
        try:
            self._on_success(job, summary)
        except OSError as exc:  # the record could not be written (spool full?): run again later
            log.exception("%s: recording the result failed; the group will run again", job.group)
            self._on_failure(job, exc)

    def _on_success(self, job: Job, summary: dict) -> None:
        plan = job.plan
        record = done_record(job, summary)
        self._sweep(job)
        self.spool.finish(job.claim, "done", record)
        self._forget(job)
        self._finished("done", record)
        observed = self._observed_task_bytes(plan, summary)
        if observed:
            self.estimator.observe(plan.strategy, plan.task_peak_bytes, observed, plan.estimate_factor)
            self.metrics.estimate_observed(plan.strategy, plan.task_peak_bytes, observed)
        if record["worker_peak_fraction"] is not None:
            self.metrics.worker_peak(plan.strategy, record["worker_peak_fraction"])
        self.metrics.group_finished("done", plan.strategy, job.run_seconds, summary["files"],
                                    summary["bytes_read"], summary["rows"])
        log.info("done %s: %d rows from %s in %.2f s (%s, attempt %d)", job.group, summary["rows"],
                 count_of(summary["files"], "file"), job.run_seconds, plan.strategy, job.attempt)

    def _on_unchanged(self, job: Job) -> None:
        """Record a run that found nothing new or changed: done, 0 files read, the output untouched."""
        record = unchanged_record(job)
        self.spool.finish(job.claim, "done", record)
        self._forget(job)
        self._finished("done", record)
        self.metrics.group_finished("done", "other", 0.0, 0, 0, record["rows"])
        log.info("unchanged %s: no file new or changed since its output (%s)", job.group,
                 count_of(record["files"], "file"))

    def _observed_task_bytes(self, plan, summary: dict) -> int:
        """What the group's heaviest task held, learned only where it ran alone on its worker.

        The worker's peak RSS less what an idle worker holds is what kills workers;
        a task that shared its worker would be blamed for its neighbours' memory,
        and a small task's RSS is mostly the worker's own growth (imports,
        allocator pages), which says nothing of the per-row model.
        """
        rss = summary.get("worker_peak_rss_bytes") or 0
        shape = self.status.shape()
        alone = plan.run_alone or max(shape.nthreads, default=1) == 1
        informative = plan.task_peak_bytes >= LEARN_MIN_SHARE_OF_SOLO * shape.solo_task_budget_bytes()
        return max(0, rss - WORKER_BASELINE_BYTES) if rss and alone and informative else 0

    def _memory_kill_kind(self, job: Job, exc: BaseException) -> str:
        """MEMORY only if a worker died of memory while running this group's task, else TRANSIENT.

        On such a death the next attempt runs each task alone on its worker, and
        when this group's task was the only one of ours there, the worker's
        memory at the kill becomes the floor of its estimate (never the others').
        """
        if job.graph is None or not isinstance(exc, KilledWorker):
            return retries.MEMORY
        try:
            hit = worker_deaths.group_memory_death(worker_deaths.fetch_deaths(self.client), job.graph.key_prefix)
        except Exception as exc_fetch:  # noqa: BLE001 - unknown cause: the safe reading
            log.warning("%s: cannot read why workers died (%s); counting it as a memory kill",
                        job.group, exc_fetch)
            return retries.MEMORY
        if hit is None:
            log.warning("%s: a worker running it was lost, not by a memory kill of its task: retried as "
                        "transient, no estimate changes", job.group)
            return retries.TRANSIENT
        job.run_alone = True
        if hit.sole_suspect:
            job.measured_task_peak_bytes = max(job.measured_task_peak_bytes,
                                               hit.death.memory_bytes - WORKER_BASELINE_BYTES)
        log.warning("%s: its task killed worker %s at %.0f MiB of %.0f MiB%s; next attempt runs alone",
                    job.group, hit.death.name, hit.death.memory_bytes / 2**20,
                    hit.death.memory_limit_bytes / 2**20, "" if hit.sole_suspect else " (shared with others)")
        return retries.MEMORY

    def _on_failure(self, job: Job, exc: BaseException) -> None:
        """Carry out :func:`~throttler.service.outcome.decide`: fall back, retry later, or fail."""
        if self._abandoned.is_set():
            return
        kind = retries.classify(exc)
        if kind == retries.MEMORY:
            kind = self._memory_kill_kind(job, exc)
        reason = retries.describe(exc)
        job.history.append(f"attempt {job.attempt} ({job.strategy}): {reason}")
        if kind == retries.MEMORY:
            job.memory_failures += 1
        cfg = self.config
        failed = job.plan.strategy if job.plan else job.strategy
        fallback = None if failed == "sum" else planner.fallback_strategy(failed, list(job.plan.files) if job.plan else [])
        outcome = retries.decide(kind, requested_strategy=job.requested_strategy, fallback=fallback,
                                 attempt=job.attempt,
                                 memory_failures=job.memory_failures, max_attempts=cfg.max_attempts,
                                 max_transient_attempts=cfg.max_transient_attempts)
        if outcome.action == retries.FALL_BACK:
            log.info("%s: keys not aligned for %s, falling back to %s", job.group, failed, outcome.strategy)
            job.strategy_override = outcome.strategy
            return self._rebuild(job, delay_seconds=0.0)
        if outcome.action == retries.FAIL:
            return self._fail(job, reason, exc)
        self.metrics.retry(retries.reason_class(exc))
        delay = retries.backoff_seconds(job.attempt)
        log.warning("%s: attempt %d failed (%s); retrying in %.1f s", job.group, job.attempt, reason, delay)
        job.attempt += 1
        self._rebuild(job, delay)

    def _rebuild(self, job: Job, delay_seconds: float) -> None:
        """Plan the job again, now or once its backoff has passed (see :meth:`_start_due`)."""
        job.state = QUEUED
        job.not_before_seconds = self.clock() + delay_seconds
        if self._stop_intake.is_set():
            self._give_back(job)
        elif delay_seconds > 0:
            with self._jobs_lock:
                self._delayed.append(job)
        else:
            self._builders.submit(self._build, job)

    def _start_due(self) -> None:
        """Hand retries whose backoff has passed to the builders (main loop)."""
        now = self.clock()
        with self._jobs_lock:
            due = [j for j in self._delayed if j.not_before_seconds <= now]
            self._delayed = [j for j in self._delayed if j.not_before_seconds > now]
        for job in due:
            self._builders.submit(self._build, job)

    def _fail(self, job: Job, reason: str, exc: BaseException) -> None:
        self._sweep(job)
        record = failed_record(job, reason, type(exc).__name__)
        self.spool.finish(job.claim, "failed", record)
        self._forget(job)
        self._finished("failed", record)
        self.metrics.group_failed_reason(retries.reason_class(exc))
        self.metrics.group_finished("failed", job.plan.strategy if job.plan else "other", job.run_seconds,
                                    0, 0, 0)
        log.error("failed %s after %d attempt(s): %s", job.group, job.attempt, reason)

    # ----------------------------------------------------------------- bookkeeping

    def _count_requests(self, job: Job) -> None:
        """Count request files received for this run (coalesced ones join late)."""
        for _ in range(len(job.claim.files) - job.requests_counted):
            self.metrics.request_received()
        job.requests_counted = len(job.claim.files)

    def _sweep(self, job: Job) -> None:
        """Remove the group's temporaries from the output directory: what attempts killed
        mid-write left, and the run's own copies of the previous output (incremental runs).

        Only the former are logged: the copies are made on purpose by every
        incremental run, so counting them would report kills that never happened.
        """
        try:
            removed = sweep_temporaries(self.config.output, job.group)
        except OSError as exc:
            log.warning("%s: cannot sweep temporary outputs: %s", job.group, exc)
            return
        left = [name for name in removed if name not in job.snapshot_names]
        if left:
            log.info("%s: removed %d temporary output(s) left by killed attempts", job.group, len(left))

    def _finished(self, kind: str, record: dict) -> None:
        if self.on_finished is not None:
            try:
                self.on_finished(kind, record)
            except Exception:  # noqa: BLE001 - a hook must not break the core path
                log.exception("on_finished hook failed")

    def _forget(self, job: Job) -> None:
        self._count_requests(job)
        with self._jobs_lock:
            if self._jobs.get(job.group) is job:
                del self._jobs[job.group]
        job.state = "ended"
        if self.on_capacity is not None:
            self.on_capacity()

    def _notify(self) -> None:
        self.submitter.notify()

    def _count_busy(self, pool: str, delta: int) -> None:
        with self._jobs_lock:
            self._busy[pool] += delta

    def live_count(self) -> int:
        with self._jobs_lock:
            return len(self._jobs)

    def is_live(self, group: str) -> bool:
        """True while ``group`` has a run in the daemon (claimed, planning, waiting, running or retrying)."""
        with self._jobs_lock:
            return group in self._jobs

    def running_count(self) -> int:
        with self._jobs_lock:
            return sum(1 for j in self._jobs.values() if j.state == RUNNING)

    def state_counts(self) -> dict[str, int]:
        with self._jobs_lock:
            counts = dict.fromkeys(STATES, 0)
            for job in self._jobs.values():
                if job.state in counts:
                    counts[job.state] += 1
            return counts

    def running_groups(self) -> list[dict]:
        with self._jobs_lock:
            jobs = [j for j in self._jobs.values() if j.state == RUNNING]
        now = self.clock()
        return [{"group": j.group, "strategy": j.plan.strategy, "estimate_bytes": j.plan.group_peak_bytes,
                 "attempt": j.attempt, "running_seconds": round(now - j.submitted_at_seconds, 3),
                 **self.progress.of(j.graph.token, j.plan.n_files, j.plan.input_bytes).as_dict()}
                for j in jobs if j.graph is not None]

    def busy(self) -> dict[str, tuple[int, int]]:
        with self._jobs_lock:
            return {pool: (self._busy[pool], self._pool_size.get(pool, 0)) for pool in self._busy}

"""The daemon: spool intake, a graph-builder pool, a submitter pool, completions.

Flow of one group::

    incoming/ --claim--> [builder pool] plan + graph --bounded hand-off--> waiting
    waiting --[submitter pool, under ONE lock: snapshot, decide, reserve, submit]--> running
    running --future done--> [completion thread] record, release, learn / retry

Deciding is :func:`throttler.admission.choose` (pure); this module carries its
decisions out. The lock is held only for check-reserve-submit. The ledger keeps
every submitted group's reservation until its future ends, which covers the lag
between a submit and the memory showing up in the scheduler's figures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from throttler import admission, graphs, planner, retries
from throttler.cluster import MEMORY_RESOURCE, memory_restriction, read_snapshot
from throttler.config import Config
from throttler.errors import DoesNotFit, NoWorkers
from throttler.estimator import file_info
from throttler.jobs import PLANNING, QUEUED, RUNNING, STATES, WAITING, Job, done_record, failed_record
from throttler.output import output_path_for, sweep_temporaries
from throttler.status import StatusReporter

log = logging.getLogger(__name__)

#: how often a group planned while the cluster has no worker tries again (no attempt used)
NO_WORKERS_RETRY_SECONDS = 1.0

#: how often "cannot read the scheduler" is logged while it stays away
UNREACHABLE_WARNING_SECONDS = 10.0


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
        self.ledger = admission.Ledger()
        self.submit_lock = threading.Lock()  #: guards check-reserve-submit, nothing else
        self._changed = threading.Condition()  #: capacity or the waiting set changed
        self._jobs: dict[str, Job] = {}  #: live jobs by group
        self._jobs_lock = threading.Lock()
        self._waiting: list[Job] = []  #: built, not yet admitted (guarded by submit_lock)
        self._delayed: list[Job] = []  #: retries waiting out their backoff (guarded by _jobs_lock)
        self._completions: queue.Queue = queue.Queue()
        self._busy = {"builder": 0, "submitter": 0}
        self._stop_intake = threading.Event()
        self._stop_submitting = threading.Event()
        self._threads: list[threading.Thread] = []
        self._builders: ThreadPoolExecutor | None = None
        self._warned_no_resources = False
        self._pool_size = {"builder": 0, "submitter": 0}
        self.status = StatusReporter(self)
        self.on_capacity = None  #: called when a run ends (the daemon wakes its main loop to claim more)
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
        self.status.shape()  # first snapshot: pool sizes derive from the cluster
        builders, submitters = self.pool_sizes()
        self._builders = ThreadPoolExecutor(builders, thread_name_prefix="throttler-builder")
        self._pool_size = {"builder": builders, "submitter": submitters}
        for i in range(submitters):
            self._spawn(self._submitter_loop, f"throttler-submitter-{i}")
        self._spawn(self._completion_loop, "throttler-completions")
        log.info("service started: %d builder threads, %d submitter threads", builders, submitters)

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def drain(self, timeout_seconds: float) -> None:
        """Ordered shutdown: stop intake, stop admitting, give back unstarted work,
        let running groups finish within ``timeout_seconds``, give back the rest."""
        deadline = self.clock() + timeout_seconds
        log.info("shutdown 1/4: intake stopped")
        self._stop_intake.set()
        if self._builders is not None:
            self._builders.shutdown(wait=True, cancel_futures=True)
        log.info("shutdown 2/4: admission stopped")
        self._stop_submitting.set()
        self._notify()
        released = self._release_unstarted()
        log.info("shutdown 3/4: %d unstarted group(s) put back in incoming/", released)
        while self.running_count() and self.clock() < deadline:
            time.sleep(0.1)
        left = self._release_running()
        log.info("shutdown 4/4: %d running group(s) left at the deadline, put back", left)
        self._completions.put(None)
        self.estimator.save()

    def _release_unstarted(self) -> int:
        with self.submit_lock:
            waiting, self._waiting = self._waiting, []
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
        with self.submit_lock:
            self.client = client
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
                      claim.priority or 0, self.clock())
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
                job.plan = self._plan(job)
                job.graph = graphs.build(job.plan, output_path_for(self.config.output, job.group))
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
        files = [file_info(path) for path in self.catalog.files(job.group)]
        return planner.make_plan(job.group, files, job.strategy, self.status.shape(), self.estimator,
                                 attempt=1 + job.memory_failures, memory_fraction=self.config.memory_fraction,
                                 fan_in=self.config.fan_in)

    def _hand_off(self, job: Job) -> None:
        """Bounded hand-off: a builder waits while enough planned groups wait for admission."""
        with self._changed:
            while len(self._waiting) >= self.max_waiting() and not self._stop_submitting.is_set():
                self._changed.wait(0.5)
        with self.submit_lock:
            if self._stop_submitting.is_set():
                self._give_back(job)
                return
            job.state = WAITING
            job.waiting_since_seconds = self.clock()
            self._waiting.append(job)
        self._notify()

    # ----------------------------------------------------------------- submitter pool

    def _submitter_loop(self) -> None:
        while not self._stop_submitting.is_set():
            try:
                progressed = self.admit_step()
            except Exception:  # noqa: BLE001 - a broken round must not kill the pool
                log.exception("admission round failed")
                progressed = False
            if not progressed:
                with self._changed:
                    self._changed.wait(self.config.poll_seconds)

    def admit_step(self) -> bool:
        """One admission round under the lock: check, reserve and submit every admitted group.

        True if any group was submitted or failed. Failures (a fatal plan, a
        submit that raised) are recorded or retried after the lock is released.
        """
        self._count_busy("submitter", +1)
        failures: list[tuple[Job, BaseException]] = []
        try:
            with self.submit_lock:
                choices, snapshot = self._choose()
                for choice in choices:
                    job = self._take_waiting(choice)
                    if not choice.decision.admit:
                        failures.append((job, DoesNotFit(choice.decision.reason)))
                        continue
                    try:
                        self._reserve_and_submit(job, choice, snapshot)
                    except Exception as exc:  # noqa: BLE001 - e.g. the scheduler went away
                        failures.append((job, exc))
        finally:
            self._count_busy("submitter", -1)
        for job, exc in failures:
            self._on_failure(job, exc)
        if choices:
            self._notify()  # builders blocked on the hand-off bound
        return bool(choices)

    def _choose(self):
        """(choices of one admission round, the snapshot they were made on)."""
        now = self.clock()
        ready = [j for j in self._waiting if j.not_before_seconds <= now]
        if not ready or self._stop_submitting.is_set():
            return [], None
        try:
            snapshot = read_snapshot(self.client)
        except Exception as exc:  # noqa: BLE001 - the scheduler is away: wait, say so now and then
            self._warn_unreachable(exc, now)
            return [], None
        self.status.observe_snapshot(snapshot)
        entries = [admission.QueueEntry(j.plan, j.priority, j.waiting_since_seconds, j.graph.token)
                   for j in ready]
        policy = admission.AdmissionPolicy(self.config.memory_fraction, self.config.max_head_wait_seconds)
        return admission.choose(snapshot, self.ledger.items(), entries, now, policy), snapshot

    def _warn_unreachable(self, exc: Exception, now: float) -> None:
        if now - self._unreachable_warned_at >= UNREACHABLE_WARNING_SECONDS:
            self._unreachable_warned_at = now
            log.warning("cannot read the scheduler, admission waits: %s", retries.describe(exc))

    def _take_waiting(self, choice) -> Job:
        job = next(j for j in self._waiting if j.graph.token == choice.entry.reservation_key)
        self._waiting.remove(job)
        return job

    def _reserve_and_submit(self, job: Job, choice, snapshot) -> None:
        now = self.clock()
        plan = job.plan
        self.ledger.reserve(admission.Reservation(job.group, job.graph.token, plan.group_peak_bytes,
                                                  plan.task_peak_bytes, now, plan.running_bytes))
        job.reservation_key = job.graph.token
        job.admission_wait_seconds += now - job.waiting_since_seconds
        job.submitted_at_seconds = now
        job.state = RUNNING
        try:
            job.future = self.client.compute(job.graph.final, resources=self._resources(plan, snapshot))
        except Exception:
            self.ledger.release(job.reservation_key)
            raise
        self.metrics.admission_wait(now - job.waiting_since_seconds)
        log.info("submitted %s (%s, %d files, %d leaves, reserves %.1f MiB): %s", job.group, plan.strategy,
                 plan.n_files, plan.n_leaf_tasks, plan.group_peak_bytes / 2**20, choice.decision.reason)
        job.future.add_done_callback(lambda _f, job=job: self._completions.put(job))

    def _resources(self, plan, snapshot) -> dict | None:
        """Per-task MEMORY restriction when the running workers declare it."""
        resources = memory_restriction(plan.task_peak_bytes, snapshot)
        if resources is None and not self._warned_no_resources:
            log.warning("workers declare no %s resource: admission alone protects them "
                        "(start workers with --resources %s=<bytes>)", MEMORY_RESOURCE, MEMORY_RESOURCE)
            self._warned_no_resources = True
        return resources

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
        if future is None or job.state != RUNNING:
            return  # released during shutdown
        self.ledger.release(job.reservation_key)
        self._notify()
        job.run_seconds = self.clock() - job.submitted_at_seconds
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
        self.estimator.observe(plan.strategy, plan.task_peak_bytes, summary["peak_bytes"], plan.estimate_factor)
        self.metrics.estimate_observed(plan.strategy, plan.task_peak_bytes, summary["peak_bytes"])
        if record["worker_peak_fraction"] is not None:
            self.metrics.worker_peak(plan.strategy, record["worker_peak_fraction"])
        self.metrics.group_finished("done", plan.strategy, job.run_seconds, summary["files"],
                                    summary["bytes_read"], summary["rows"])
        log.info("done %s: %d rows from %d files in %.2f s (%s, attempt %d)", job.group, summary["rows"],
                 summary["files"], job.run_seconds, plan.strategy, job.attempt)

    def _on_failure(self, job: Job, exc: BaseException) -> None:
        """Decide what a failure means: fall back, retry later, or fail for good."""
        kind = retries.classify(exc)
        reason = retries.describe(exc)
        job.history.append(f"attempt {job.attempt} ({job.strategy}): {reason}")
        if kind == retries.MISALIGNED and job.requested_strategy == "auto" and job.strategy_override != "sum":
            failed = job.plan.strategy if job.plan else job.strategy
            job.strategy_override = planner.fallback_strategy(failed, list(job.plan.files) if job.plan else [])
            log.info("%s: keys not aligned for %s, falling back to %s", job.group, failed, job.strategy_override)
            return self._rebuild(job, delay_seconds=0.0)
        limit = self.config.max_transient_attempts if kind == retries.TRANSIENT else self.config.max_attempts
        if kind == retries.MEMORY:
            job.memory_failures += 1
        failures = job.memory_failures if kind == retries.MEMORY else job.attempt
        if kind in (retries.PERMANENT, retries.MISALIGNED) or failures >= limit:
            return self._fail(job, reason, exc)
        if kind == retries.MEMORY and job.plan is not None:
            self.estimator.observe(job.plan.strategy, job.plan.task_peak_bytes, 2 * job.plan.task_peak_bytes,
                                   job.plan.estimate_factor)
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
        self.spool.finish(job.claim, "failed", failed_record(job, reason, type(exc).__name__))
        self._forget(job)
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
        """Remove what attempts of this group killed mid-write left in the output directory."""
        try:
            removed = sweep_temporaries(self.config.output, job.group)
        except OSError as exc:
            log.warning("%s: cannot sweep temporary outputs: %s", job.group, exc)
            return
        if removed:
            log.info("%s: removed %d temporary output(s) left by killed attempts", job.group, len(removed))

    def _forget(self, job: Job) -> None:
        self._count_requests(job)
        with self._jobs_lock:
            if self._jobs.get(job.group) is job:
                del self._jobs[job.group]
        job.state = "ended"
        if self.on_capacity is not None:
            self.on_capacity()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _count_busy(self, pool: str, delta: int) -> None:
        with self._jobs_lock:
            self._busy[pool] += delta

    def live_count(self) -> int:
        with self._jobs_lock:
            return len(self._jobs)

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
                 "attempt": j.attempt, "running_seconds": round(now - j.submitted_at_seconds, 3)} for j in jobs]

    def busy(self) -> dict[str, tuple[int, int]]:
        with self._jobs_lock:
            return {pool: (self._busy[pool], self._pool_size.get(pool, 0)) for pool in self._busy}

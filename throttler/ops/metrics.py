"""Prometheus metrics of the throttler daemon.

:class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the global one), so every test and every daemon instance starts from
zero. The service calls one method per event or snapshot; each method is
wrapped so that a failure inside it is logged and swallowed: a broken metric
must never fail a group (the habit of dramatiq's ``emit_after``).

Conventions: ``throttler_`` prefix, base units (seconds, bytes), ``_total``
counters, histograms for durations and sizes. Label values come from small
fixed sets (anything else becomes ``other``); group ids and file names are
never label values.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from typing import Callable, Iterable, Mapping, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from throttler import __version__
from throttler.planning.plan import STRATEGIES
from throttler.service.jobs import STATES as JOB_STATES
from throttler.service.outcome import REASON_CLASSES
from throttler.spool.requests import RECORD_KINDS, REFUSAL_CLASSES

# ``*_created`` series double the series count and confuse rate() readers;
# the flag is process-wide and read at collection time.
disable_created_metrics()

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:9464"

# Label sets live beside the code that produces the values; these are those sets.
REJECT_REASONS = REFUSAL_CLASSES  #: why the spool refused a request
FAILURE_REASONS = REASON_CLASSES  #: why a group's attempt failed
OUTCOMES = RECORD_KINDS  #: the record a group ends with
GROUP_STATES = JOB_STATES
QUEUE_DIRS = ("incoming", "active")
WORKER_STATUSES = ("running", "paused", "closing", "other")
POOLS = ("builder", "submitter")
STRATEGY_LABELS = STRATEGIES + ("other",)

#: Group run time: seconds to an hour.
RUN_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Time from "planned" to "admitted": instant to an hour of waiting for memory.
WAIT_SECONDS_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
#: Task peak memory: 1 MiB to 64 GiB in steps of four.
PEAK_BYTES_BUCKETS = tuple(float(2**20 * 4**k) for k in range(9))
#: observed/estimated; 1.0 is a perfect estimate, above 1 an underestimate.
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0)
#: Worker peak RSS over memory limit: Dask spills at 0.7, pauses at 0.8, kills at 0.95.
LIMIT_FRACTION_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)

F = TypeVar("F", bound=Callable[..., None])


def _never_raises(method: F) -> F:
    """Log and swallow any exception of a metrics update."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception:
            logger.warning("metrics update %s failed", method.__name__, exc_info=True)

    return wrapper  # type: ignore[return-value]


def _label(value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"`` (bounded cardinality)."""
    value = getattr(value, "value", value)  # accept enums such as distributed's Status
    return value if isinstance(value, str) and value in allowed else "other"


def _count(value: object) -> int:
    """A non-negative int, or ValueError: counters must never go backwards."""
    n = int(value)  # type: ignore[call-overload]
    if n < 0:
        raise ValueError(f"negative count {value!r}")
    return n


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into host and port.

    An empty host (``":9464"``) means loopback, not every interface:
    exposing metrics beyond the host must be asked for (``"0.0.0.0:9464"``).
    """
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ValueError(f"metrics address must be host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


#: the cluster memory gauges, as admission sees it (``limit`` keeps its name for existing dashboards and
#: alerts: it is the capacity admission fills, memory_fraction of the workers' limits, not the limits' sum)
CLUSTER_MEMORY_HELP = {
    "limit": "Cluster memory admission may fill: memory_fraction x the sum of the workers' limits.",
    "used": "Cluster memory used as admission sees it: what the workers show, or the workers' own memory "
            "plus throttler's reservations when that is more.",
    "free": "Cluster memory admission still sees free: the capacity less used.",
}


class Metrics:
    """Every metric of the daemon, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._received = Counter("throttler_requests_received", "Queue requests read.", registry=r)
        self._rejected = Counter(
            "throttler_requests_rejected", "Queue requests refused, by reason class.",
            ["reason"], registry=r)
        self._finished = Counter(
            "throttler_groups_finished", "Groups that ended, by outcome and strategy.",
            ["outcome", "strategy"], registry=r)
        self._run_seconds = Histogram(
            "throttler_group_run_seconds", "Wall time of a group from admission to result.",
            ["strategy"], buckets=RUN_SECONDS_BUCKETS, registry=r)
        self._files = Counter("throttler_files_processed", "Input files of finished groups.", registry=r)
        self._bytes = Counter("throttler_bytes_processed", "Input bytes read by finished groups.", registry=r)
        self._rows = Counter("throttler_rows_written", "Rows written to outputs.", registry=r)
        self._failures = Counter(
            "throttler_group_failures", "Group failures, by reason class.", ["reason"], registry=r)
        self._groups = Gauge("throttler_groups", "Groups in the daemon, by state.", ["state"], registry=r)
        self._queue = Gauge(
            "throttler_queue_depth", "Request files in the spool, by directory.", ["dir"], registry=r)
        self._wait = Histogram(
            "throttler_admission_wait_seconds", "Time a planned group waited for memory.",
            buckets=WAIT_SECONDS_BUCKETS, registry=r)
        self._define_memory_metrics(r)
        self._retries = Counter("throttler_retries", "Group retries, by reason class.", ["reason"], registry=r)
        self._losses = Counter("throttler_worker_losses", "Dask workers lost (died or removed).", registry=r)
        self._incompatible = Gauge(
            "throttler_workers_incompatible",
            "Workers without this daemon's version of dask-throttler (the log says why).", registry=r)
        self._unlimited = Gauge(
            "throttler_workers_without_memory_limit",
            "Running workers with no memory limit, sized from an assumed one.", registry=r)
        self._host_capped = Gauge(
            "throttler_workers_host_capped",
            "Running workers whose memory limits overcommit their machine, sized to their share of it.",
            registry=r)
        self._no_data_access = Gauge(
            "throttler_workers_without_data_access",
            "Workers that cannot list the data root (mount, endpoint or credentials; the log says why).",
            registry=r)
        self._pool_busy = Gauge("throttler_pool_busy_threads", "Busy threads, by pool.", ["pool"], registry=r)
        self._pool_size = Gauge("throttler_pool_threads", "Threads, by pool.", ["pool"], registry=r)
        self._build = Gauge(
            "throttler_build_info", "Always 1; labels tell the running version.",
            ["version", "python_version"], registry=r)
        self._start = Gauge("throttler_start_time_seconds", "Unix time the daemon started.", registry=r)
        self._loop = Gauge(
            "throttler_last_loop_timestamp_seconds", "Unix time of the main loop's last iteration.",
            registry=r)
        self._preinitialise()

    def _define_memory_metrics(self, r: CollectorRegistry) -> None:
        """The memory metrics: reserved, the cluster's as admission sees it, workers, estimates."""
        self._reserved = Gauge(
            "throttler_memory_reserved_bytes", "Memory reserved by admitted groups.", registry=r)
        self._mem = {
            kind: Gauge(f"throttler_cluster_memory_{kind}_bytes", text, registry=r)
            for kind, text in CLUSTER_MEMORY_HELP.items()
        }
        self._workers = Gauge("throttler_workers", "Dask workers, by status.", ["status"], registry=r)
        self._est = Histogram(
            "throttler_task_peak_estimated_bytes", "Estimated peak memory of the largest task.",
            ["strategy"], buckets=PEAK_BYTES_BUCKETS, registry=r)
        self._obs = Histogram(
            "throttler_task_peak_observed_bytes", "Observed peak memory of the largest task.",
            ["strategy"], buckets=PEAK_BYTES_BUCKETS, registry=r)
        self._ratio = Histogram(
            "throttler_estimate_ratio", "Observed over estimated task peak memory.",
            ["strategy"], buckets=RATIO_BUCKETS, registry=r)
        self._worker_peak = Histogram(
            "throttler_worker_peak_fraction",
            "Per finished group, the highest peak RSS of a worker while running one of its tasks, "
            "over that worker's memory limit.",
            ["strategy"], buckets=LIMIT_FRACTION_BUCKETS, registry=r)

    def _preinitialise(self) -> None:
        """Create every known labelled series, so queries see 0 rather than no data."""
        for strategy in STRATEGIES:
            for outcome in OUTCOMES:
                self._finished.labels(outcome, strategy)
            for hist in (self._run_seconds, self._est, self._obs, self._ratio):
                hist.labels(strategy)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        for reason in FAILURE_REASONS:
            self._failures.labels(reason)
            self._retries.labels(reason)
        for state in GROUP_STATES:
            self._groups.labels(state)
        for d in QUEUE_DIRS:
            self._queue.labels(d)
        for status in WORKER_STATUSES:
            self._workers.labels(status)
        for pool in POOLS:
            self._pool_busy.labels(pool)
            self._pool_size.labels(pool)

    def serve(self, address: str = DEFAULT_ADDRESS):
        """Serve ``/metrics`` on ``host:port`` in a daemon thread.

        Port 0 picks a free port. Returns ``(server, thread, bound_port)``;
        stop with ``server.shutdown(); server.server_close()``. A bind error
        raises: a wrong address is a configuration error, seen at start.
        """
        host, port = parse_address(address)
        server, thread = start_http_server(port, host, self.registry)
        return server, thread, server.server_port

    # Requests -----------------------------------------------------------

    @_never_raises
    def request_received(self) -> None:
        self._received.inc()

    @_never_raises
    def request_rejected(self, reason_class: str) -> None:
        self._rejected.labels(_label(reason_class, REJECT_REASONS)).inc()

    # Groups -------------------------------------------------------------

    @_never_raises
    def group_finished(self, outcome: str, strategy: str, seconds: float,
                       files: int, bytes_read: int, rows: int) -> None:
        """Count a finished group; every value is checked before anything changes."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        strategy = _label(strategy, STRATEGY_LABELS)
        seconds = float(seconds)
        files, bytes_read, rows = _count(files), _count(bytes_read), _count(rows)
        self._finished.labels(outcome, strategy).inc()
        self._run_seconds.labels(strategy).observe(seconds)
        self._files.inc(files)
        self._bytes.inc(bytes_read)
        self._rows.inc(rows)

    @_never_raises
    def group_failed_reason(self, reason_class: str) -> None:
        self._failures.labels(_label(reason_class, FAILURE_REASONS)).inc()

    @_never_raises
    def retry(self, reason_class: str) -> None:
        self._retries.labels(_label(reason_class, FAILURE_REASONS)).inc()

    @_never_raises
    def set_group_states(self, counts: Mapping[str, int]) -> None:
        """Set every state's gauge; a state missing from ``counts`` is 0."""
        values = {state: _count(counts.get(state, 0)) for state in GROUP_STATES}
        for state, n in values.items():
            self._groups.labels(state).set(n)

    @_never_raises
    def set_queue_depth(self, incoming: int, active: int) -> None:
        incoming, active = _count(incoming), _count(active)
        self._queue.labels("incoming").set(incoming)
        self._queue.labels("active").set(active)

    # Admission and memory -----------------------------------------------

    @_never_raises
    def admission_wait(self, seconds: float) -> None:
        self._wait.observe(float(seconds))

    @_never_raises
    def set_reserved_bytes(self, n: int) -> None:
        self._reserved.set(_count(n))

    @_never_raises
    def set_cluster_memory(self, limit_bytes: int, used_bytes: int, free_bytes: int) -> None:
        values = {"limit": float(limit_bytes), "used": float(used_bytes), "free": float(free_bytes)}
        for kind, value in values.items():
            self._mem[kind].set(value)

    @_never_raises
    def estimate_observed(self, strategy: str, estimated_bytes: int, observed_bytes: int) -> None:
        """Record one task's estimated and observed peak; the ratio needs an estimate > 0."""
        strategy = _label(strategy, STRATEGY_LABELS)
        estimated, observed = float(estimated_bytes), float(observed_bytes)
        if estimated < 0 or observed < 0:
            raise ValueError(f"negative bytes: {estimated_bytes!r}, {observed_bytes!r}")
        self._est.labels(strategy).observe(estimated)
        self._obs.labels(strategy).observe(observed)
        if estimated > 0:
            self._ratio.labels(strategy).observe(observed / estimated)

    @_never_raises
    def worker_peak(self, strategy: str, fraction: float) -> None:
        """Record a group's worker peak RSS over memory limit (see :mod:`throttler.worker.peakrss`)."""
        fraction = float(fraction)
        if not fraction >= 0:
            raise ValueError(f"fraction must be >= 0, got {fraction!r}")
        self._worker_peak.labels(_label(strategy, STRATEGY_LABELS)).observe(fraction)

    # Cluster and threads ------------------------------------------------

    @_never_raises
    def set_workers(self, by_status: Mapping[str, int]) -> None:
        """Set workers per status; unknown statuses add up under ``other``."""
        totals = dict.fromkeys(WORKER_STATUSES, 0)
        for status, n in by_status.items():
            status = getattr(status, "value", status)
            if status == "closing_gracefully":
                status = "closing"
            totals[_label(status, WORKER_STATUSES)] += _count(n)
        for status, n in totals.items():
            self._workers.labels(status).set(n)

    @_never_raises
    def worker_lost(self) -> None:
        self._losses.inc()

    @_never_raises
    def set_workers_incompatible(self, n: int) -> None:
        self._incompatible.set(_count(n))

    @_never_raises
    def set_workers_without_memory_limit(self, n: int) -> None:
        self._unlimited.set(_count(n))

    @_never_raises
    def set_workers_host_capped(self, n: int) -> None:
        self._host_capped.set(_count(n))

    @_never_raises
    def set_workers_without_data_access(self, n: int) -> None:
        self._no_data_access.set(_count(n))

    @_never_raises
    def set_pool(self, pool: str, busy: int, size: int) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        busy, size = _count(busy), _count(size)
        self._pool_busy.labels(pool).set(busy)
        self._pool_size.labels(pool).set(size)

    # Daemon -------------------------------------------------------------

    @_never_raises
    def set_up(self, info: Mapping[str, object]) -> None:
        """Publish build info and start time (``info`` may hold ``version``, ``start_time_seconds``)."""
        version = str(info.get("version") or __version__)
        start = float(info.get("start_time_seconds") or time.time())  # type: ignore[arg-type]
        self._build.clear()
        self._build.labels(version, platform.python_version()).set(1)
        self._start.set(start)

    @_never_raises
    def heartbeat(self) -> None:
        self._loop.set_to_current_time()

"""``throttler serve``: wiring, signals, the main loop and the ordered shutdown.

Signal handlers only set flags; the main loop acts on them. SIGTERM/SIGINT
drain (stop intake, finish running groups within the drain timeout, put the
rest back); a second SIGTERM exits at once (claims left in ``active/`` are
requeued at the next start). SIGHUP reloads the configuration.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time

import tenacity

from throttler import config as config_mod
from throttler import storage
from throttler.cluster.embedded import start_embedded_cluster
from throttler.commands import checks
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.ops.status import StartingStatus
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.service import outcome as retries
from throttler.service.service import Service
from throttler.errors import ThrottlerError
from throttler.spool.daemon_lock import DaemonLock
from throttler.spool.group_watch import GroupWatcher
from throttler.spool.queue import Spool
from throttler.spool.watcher import SpoolWatcher
from throttler.worker.output import sweep_temporaries

log = logging.getLogger(__name__)

#: settings a SIGHUP may change while running (the rest need a restart)
RELOADABLE = ("strategy", "memory_fraction", "max_head_wait_seconds", "poll_seconds", "rescan_seconds",
              "max_attempts", "max_transient_attempts", "fan_in", "log_level", "drain_timeout_seconds")


#: a backlog in incoming/ is listed at most this often (new files and the periodic rescan still count)
MIN_RESCAN_SECONDS = 0.5

#: how long one attempt to connect to the scheduler at start waits
CONNECT_TIMEOUT_SECONDS = 10.0

#: umask of the daemon (and of the embedded cluster's worker processes it starts)
DAEMON_UMASK = 0o027


class Signals:
    """Flags set by signal handlers; the main loop reads them."""

    def __init__(self):
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, frame) -> None:
        if self.stop.is_set():
            os._exit(128 + signum)  # second signal: exit at once, claims are recovered at start
        self.stop.set()
        self.wake.set()

    def _on_reload(self, signum, frame) -> None:
        self.reload.set()
        self.wake.set()


def connect(cfg: config_mod.Config, stop: threading.Event | None = None):
    """(client, embedded cluster or None): the scheduler given, else a local cluster.

    Retries an unreachable scheduler (:data:`throttler.service.outcome.SCHEDULER_RETRY`)
    until ``stop`` is set; then the last connection error is raised.
    """
    if not cfg.scheduler:
        return _embedded(cfg)
    from distributed import Client

    stop = stop or threading.Event()
    policy = {**retries.SCHEDULER_RETRY, "sleep": stop.wait, "before_sleep": _log_unreachable(cfg.scheduler),
              "stop": retries.SCHEDULER_RETRY["stop"] | tenacity.stop_when_event_set(stop)}
    log.info("connecting to scheduler %s (each attempt waits up to %.0f s)", cfg.scheduler, CONNECT_TIMEOUT_SECONDS)
    for attempt in tenacity.Retrying(**policy):
        with attempt:
            client = Client(cfg.scheduler, timeout=f"{CONNECT_TIMEOUT_SECONDS}s")
    log.info("connected to scheduler %s", cfg.scheduler)
    return client, None


def _log_unreachable(address: str):
    """tenacity's ``before_sleep``: one warning per failed connection attempt, saying when the next one is."""
    def warn(state: tenacity.RetryCallState) -> None:
        log.warning("scheduler %s unreachable (attempt %d, %.0f s so far): %s; next attempt in %.1f s", address,
                    state.attempt_number, state.seconds_since_start or 0.0,
                    retries.describe(state.outcome.exception()), state.next_action.sleep)
    return warn


def _reconnector(cfg):
    """One quick connection attempt to the configured scheduler (None when embedded)."""
    if not cfg.scheduler:
        return None
    from distributed import Client

    return lambda: Client(cfg.scheduler, timeout="5s")


def _embedded(cfg):
    cluster, client = start_embedded_cluster(cfg.worker_memory_bytes or None, cfg.workers or None,
                                             cfg.threads_per_worker or None)
    return client, cluster


def serve(cfg: config_mod.Config, config_path: str | None = None, overrides: dict | None = None) -> int:
    """Run the daemon until stopped; returns the exit code."""
    check_paths(cfg)
    os.umask(DAEMON_UMASK)  # records, state, and the embedded workers' outputs: no world access
    signals = Signals()
    signals.install()
    spool = Spool(cfg.spool, allowed_uids=cfg.allowed_uids, min_rescan_seconds=MIN_RESCAN_SECONDS).ensure()
    lock = DaemonLock(spool.state_dir, cfg.spool).acquire()  # before recovery: never another daemon's claims
    try:
        return _serve_locked(cfg, spool, signals, config_path, overrides)
    finally:
        lock.release()


def _serve_locked(cfg: config_mod.Config, spool: Spool, signals: Signals, config_path, overrides) -> int:
    metrics = Metrics()
    metrics_server = _serve_metrics(metrics, cfg)  # a port in use refuses the start before recovery too
    os.makedirs(cfg.output, mode=0o750, exist_ok=True)
    log.info("spool recovery: %s; stray temporary outputs removed: %d",
             spool.recover(), len(sweep_temporaries(cfg.output)))
    waiting_for = f"connecting to scheduler {cfg.scheduler}" if cfg.scheduler else "starting the embedded cluster"
    try:
        with StartingStatus(spool.state_dir, waiting_for):
            client, cluster = connect(cfg, signals.stop)
    except BaseException as exc:
        _close(None, None, metrics_server)
        if not signals.stop.is_set():
            raise
        log.info("stopped while connecting to the scheduler (%s)", exc)
        return 0
    service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, cfg.manifest),
                      estimator=Estimator(str(spool.state_dir / "estimator.json")), metrics=metrics,
                      notifier=sdnotify, reconnect=_reconnector(cfg))
    watcher = SpoolWatcher(spool, signals.wake, cfg.rescan_seconds)
    groups = GroupWatcher(str(cfg.data_root), spool.submit, service.is_live, cfg.watch_debounce_seconds) \
        if cfg.watch else None
    try:
        service.on_capacity = signals.wake.set
        service.start()
        watcher.start()
        if groups is not None:
            groups.start()
        metrics.set_up({"version": _version()})
        sdnotify.ready(service.status.summary_line())
        log.info("serving spool %s; data root %s%s; output %s; %s; metrics %s", cfg.spool, cfg.data_root,
                 f" (manifest {cfg.manifest})" if cfg.manifest else "", cfg.output, _cluster_line(cfg, cluster),
                 _metrics_line(metrics_server))
        _main_loop(service, signals, watcher, config_path, overrides)
        sdnotify.stopping()
        service.drain(service.config.drain_timeout_seconds)
    finally:
        if groups is not None:
            groups.stop()
        watcher.stop()
        _close(service.client, cluster, metrics_server)
    log.info("stopped")
    return 0


def _main_loop(service: Service, signals: Signals, watcher: SpoolWatcher, config_path, overrides) -> None:
    watchdog_seconds = sdnotify.watchdog_interval_seconds()
    last_ping = last_status = 0.0
    while not signals.stop.is_set():
        if signals.reload.is_set():
            signals.reload.clear()
            _reload(service, config_path, overrides)
            watcher.rescan_seconds = service.config.rescan_seconds
        try:
            service.step()
        except Exception:  # noqa: BLE001 - keep serving; the log says what broke
            log.exception("main loop step failed")
        service.metrics.heartbeat()
        now = time.monotonic()
        if watchdog_seconds and now - last_ping >= watchdog_seconds:
            sdnotify.watchdog()
            last_ping = now
        if now - last_status >= 1.0:
            sdnotify.status(service.status.summary_line())
            last_status = now
        signals.wake.wait(_wait_seconds(service.config.rescan_seconds, watchdog_seconds, last_ping))
        signals.wake.clear()


def _wait_seconds(rescan_seconds: float, watchdog_seconds: float | None, last_ping: float) -> float:
    """How long the main loop may sleep: at most 1 s, the rescan period, and never
    past the next watchdog ping (a wake-up in between must not push the ping back)."""
    wait = min(1.0, rescan_seconds)
    if watchdog_seconds:
        wait = min(wait, max(0.0, last_ping + watchdog_seconds - time.monotonic()))
    return wait


def _reload(service: Service, config_path, overrides) -> None:
    sdnotify.reloading()
    try:
        new = config_mod.load(config_path, overrides)
        level = log_level_number(new.log_level)
    except config_mod.ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
    else:
        old = service.config
        changes = {k: getattr(new, k) for k in RELOADABLE if getattr(new, k) != getattr(old, k)}
        ignored = [f.name for f in dataclasses.fields(new)
                   if f.name not in RELOADABLE and getattr(new, f.name) != getattr(old, f.name)]
        service.config = dataclasses.replace(old, **changes)
        root = logging.getLogger()
        root.setLevel(min(root.level, level))  # the confirmation shows under the old or the new level
        log.info("configuration reloaded: %s", changes or "no change")
        root.setLevel(level)
        if ignored:
            log.warning("configuration change(s) to %s need a restart; still using the old value(s)",
                        ", ".join(ignored))
    sdnotify.ready(service.status.summary_line())


def log_level_number(name: str) -> int:
    """The logging level called ``name`` (any case); ConfigError if there is none."""
    level = logging.getLevelNamesMapping().get(str(name).upper())
    if level is None:
        raise config_mod.ConfigError(f"log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
                                     f"not {name!r}")
    return level


def check_paths(cfg: config_mod.Config) -> None:
    """Refuse, before anything starts, a data root, manifest or output the daemon cannot use."""
    checks.data_inputs(cfg.data_root, cfg.manifest)
    if cfg.watch and (cfg.manifest or storage.is_url(cfg.data_root)):
        raise config_mod.ConfigError("--watch needs a local data root whose groups are directories (no manifest, "
                                     "no object store: neither sends change events)")
    checks.writable_directory(cfg.output, "output", create=False)
    parent = os.path.dirname(os.path.abspath(cfg.spool))
    if not os.path.isdir(cfg.spool):
        checks.writable_directory(parent, "spool's parent directory", create=False)


def _cluster_line(cfg: config_mod.Config, cluster) -> str:
    if cluster is None:
        return f"scheduler {cfg.scheduler}"
    workers = cluster.scheduler_info.get("workers", {}).values()
    limits = sorted({w.get("memory_limit", 0) for w in workers})
    threads = sorted({w.get("nthreads", 0) for w in workers})
    return (f"embedded cluster of {len(workers)} workers x {'/'.join(map(str, threads))} threads, "
            f"{'/'.join(f'{limit / 2**30:.1f}' for limit in limits)} GiB each")


def _metrics_line(server) -> str:
    if server is None:
        return "off"
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/metrics"


def _serve_metrics(metrics: Metrics, cfg):
    """The metrics endpoint, or None when disabled; an address that cannot be bound refuses the start
    (exit 2, one line: under systemd no restart loop), as a wrong path does."""
    if not cfg.metrics_address:
        return None
    try:
        server, _thread, port = metrics.serve(cfg.metrics_address)
    except OSError as exc:
        raise ThrottlerError(f"cannot serve metrics on {cfg.metrics_address}: {exc.strerror or exc} (another "
                             "process listens there? set metrics_address, or an empty one to disable)") from None
    log.info("metrics on http://%s:%d/metrics", server.server_address[0], port)
    return server


def _close(client, cluster, metrics_server) -> None:
    for what, closer in (("client", client.close if client is not None else None),
                         ("cluster", cluster.close if cluster is not None else None),
                         ("metrics", metrics_server.shutdown if metrics_server is not None else None)):
        if closer is None:
            continue
        try:
            closer()
        except Exception as exc:  # noqa: BLE001
            log.warning("closing %s: %s", what, exc)


def _version() -> str:
    from throttler import __version__

    return __version__

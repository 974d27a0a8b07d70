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
from throttler import retries, sdnotify
from throttler.catalog import Catalog
from throttler.cluster import start_embedded_cluster
from throttler.estimator import Estimator
from throttler.metrics import Metrics
from throttler.output import sweep_temporaries
from throttler.service import Service
from throttler.spool import Spool, SpoolWatcher

log = logging.getLogger(__name__)

#: settings a SIGHUP may change while running (the rest need a restart)
RELOADABLE = ("strategy", "memory_fraction", "max_head_wait_seconds", "poll_seconds", "rescan_seconds",
              "max_attempts", "max_transient_attempts", "fan_in", "log_level")


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


def connect(cfg: config_mod.Config):
    """(client, embedded cluster or None): the scheduler given, else a local cluster."""
    if not cfg.scheduler:
        return _embedded(cfg)
    from distributed import Client

    for attempt in tenacity.Retrying(**retries.SCHEDULER_RETRY):
        with attempt:
            client = Client(cfg.scheduler, timeout="10s")
    log.info("connected to scheduler %s", cfg.scheduler)
    return client, None


def _embedded(cfg):
    cluster, client = start_embedded_cluster(cfg.worker_memory_bytes or None, cfg.workers or None,
                                             cfg.threads_per_worker or None)
    return client, cluster


def serve(cfg: config_mod.Config, config_path: str | None = None, overrides: dict | None = None) -> int:
    """Run the daemon until stopped; returns the exit code."""
    signals = Signals()
    signals.install()
    spool = Spool(cfg.spool, allowed_uids=cfg.allowed_uids).ensure()
    os.makedirs(cfg.output, mode=0o750, exist_ok=True)
    log.info("spool recovery: %s; stray temporary outputs removed: %d",
             spool.recover(), len(sweep_temporaries(cfg.output)))
    metrics = Metrics()
    metrics_server = _serve_metrics(metrics, cfg)
    client, cluster = connect(cfg)
    service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, cfg.manifest),
                      estimator=Estimator(str(spool.state_dir / "estimator.json")), metrics=metrics,
                      notifier=sdnotify)
    watcher = SpoolWatcher(spool, signals.wake, cfg.rescan_seconds)
    try:
        service.start()
        watcher.start()
        metrics.set_up({"version": _version()})
        sdnotify.ready(service.status.summary_line())
        log.info("serving spool %s", cfg.spool)
        _main_loop(service, signals, config_path, overrides)
        sdnotify.stopping()
        service.drain(service.config.drain_timeout_seconds)
    finally:
        watcher.stop()
        _close(client, cluster, metrics_server)
    log.info("stopped")
    return 0


def _main_loop(service: Service, signals: Signals, config_path, overrides) -> None:
    watchdog_seconds = sdnotify.watchdog_interval_seconds()
    last_ping = last_status = 0.0
    while not signals.stop.is_set():
        if signals.reload.is_set():
            signals.reload.clear()
            _reload(service, config_path, overrides)
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
        signals.wake.wait(min(1.0, service.config.rescan_seconds, watchdog_seconds or 1.0))
        signals.wake.clear()


def _reload(service: Service, config_path, overrides) -> None:
    sdnotify.reloading()
    try:
        new = config_mod.load(config_path, overrides)
    except config_mod.ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
    else:
        changes = {k: getattr(new, k) for k in RELOADABLE if getattr(new, k) != getattr(service.config, k)}
        service.config = dataclasses.replace(service.config, **changes)
        logging.getLogger().setLevel(service.config.log_level)
        log.info("configuration reloaded: %s", changes or "no change")
    sdnotify.ready(service.status.summary_line())


def _serve_metrics(metrics: Metrics, cfg):
    if not cfg.metrics_address:
        return None
    server, _thread, port = metrics.serve(cfg.metrics_address)
    log.info("metrics on http://%s:%d/metrics", cfg.metrics_address.rsplit(":", 1)[0], port)
    return server


def _close(client, cluster, metrics_server) -> None:
    for what, closer in (("client", client.close), ("cluster", cluster.close if cluster else None),
                         ("metrics", metrics_server.shutdown if metrics_server else None)):
        if closer is None:
            continue
        try:
            closer()
        except Exception as exc:  # noqa: BLE001
            log.warning("closing %s: %s", what, exc)


def _version() -> str:
    from throttler import __version__

    return __version__

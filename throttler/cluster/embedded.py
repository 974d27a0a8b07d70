"""The embedded local cluster, started when no scheduler address is given."""

from __future__ import annotations

import logging

import psutil

log = logging.getLogger(__name__)

#: Share of the machine's memory the embedded cluster's workers may use together.
EMBEDDED_MEMORY_SHARE = 0.8

#: imported by every embedded worker process as it starts: a terminal's Ctrl-C is the parent's to handle
WORKER_PRELOAD = "throttler.cluster.worker_signals"


def default_worker_layout(n_workers: int | None = None, threads_per_worker: int | None = None,
                          memory_limit_bytes: int | None = None) -> tuple[int, int, int]:
    """(workers, threads each, memory limit each) sized to this machine.

    One single-threaded worker per core; together they get 80% of the memory.
    """
    n = n_workers or psutil.cpu_count(logical=True) or 1
    threads = threads_per_worker or 1
    limit = memory_limit_bytes or int(psutil.virtual_memory().total * EMBEDDED_MEMORY_SHARE / n)
    return n, threads, limit


def start_embedded_cluster(memory_limit_bytes: int | None = None, n_workers: int | None = None,
                           threads_per_worker: int | None = None):
    """Start a LocalCluster of worker processes with a memory limit; returns (cluster, client).

    Like any other cluster, its workers get the daemon's memory resources from
    the worker plugin the service registers (:mod:`throttler.cluster.worker_memory`).
    The worker processes ignore SIGINT (:mod:`throttler.cluster.worker_signals`).
    """
    from distributed import Client, LocalCluster

    n, threads, limit = default_worker_layout(n_workers, threads_per_worker, memory_limit_bytes)
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=threads, processes=True, memory_limit=limit,
        dashboard_address=None, silence_logs=logging.WARNING, preload=[WORKER_PRELOAD],
    )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    log.info("embedded cluster: %d workers x %d threads, %.1f GiB each", n, threads, limit / 2**30)
    return cluster, client

"""A throttler task on a nanny-started worker takes its temporaries from the heap (throttler/worker/allocator.py).

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
fixes glibc's mmap threshold at 128 KiB; a task wrapped as the graphs wrap
theirs (:class:`~throttler.worker.peakrss.Measured`) runs with it raised, and the
daemon's ``task_mmap_threshold_bytes`` reaches the workers through their plugin.
"""

from __future__ import annotations

from tests.helpers.glibc import mapped_on_its_own
from throttler.cluster import worker_settings
from throttler.config import load
from throttler.worker.peakrss import Measured


def _one_mib_block() -> dict:
    return {"mapped": mapped_on_its_own()}


def _forget_daemon_settings() -> None:
    from throttler.cluster import worker_settings

    worker_settings._from_daemon.clear()


def _blocks(client) -> list[int]:
    workers = sorted(client.scheduler_info()["workers"])
    futures = [client.submit(Measured(_one_mib_block), pure=False, workers=[w]) for w in workers]
    return [f.result()["mapped"] for f in futures]


def test_on_nanny_started_workers_a_task_takes_blocks_from_the_heap_unless_the_daemon_says_0(client):
    assert set(client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {"65536"}
    assert set(client.run(mapped_on_its_own).values()) == {1}  # outside a task: mapped on its own
    assert _blocks(client) == [0, 0]
    try:
        worker_settings.register(client, load(overrides={"task_mmap_threshold_bytes": 0}, environ={}))
        assert _blocks(client) == [1, 1]
    finally:
        client.unregister_worker_plugin(worker_settings.WorkerSettingsPlugin.name)
        client.run(_forget_daemon_settings)
    assert _blocks(client) == [0, 0]

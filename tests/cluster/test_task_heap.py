"""A ``dense`` task on a nanny-started worker takes its temporaries from the heap (throttler/worker/allocator.py).

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
fixes glibc's mmap threshold at 128 KiB. The real ``dense_leaf``, submitted as
a task, runs its body with the threshold raised (a 1 MiB block from the heap),
unless the daemon's ``task_mmap_threshold_bytes``, given to the workers by
their plugin, is 0; other tasks see the nanny's setting.
"""

from __future__ import annotations

import os

from tests.helpers.datafiles import write_sim
from tests.helpers.glibc import mapped_on_its_own
from throttler.cluster import worker_settings
from throttler.config import load
from throttler.worker import dense

_seen: list[int] = []  #: in each worker process: what the probed leaf bodies saw


def _probe_leaf_bodies(install: bool) -> None:
    """Make the worker's ``dense._leaf`` (the body ``dense_leaf`` runs) note where a 1 MiB block comes from."""
    import tests.cluster.test_task_heap as here
    from throttler.worker import dense as worker_dense

    real = getattr(worker_dense._leaf, "__probed__", worker_dense._leaf)
    if not install:
        worker_dense._leaf = real
        return

    def probed(*args, **kwargs):
        here._seen.append(mapped_on_its_own())
        return real(*args, **kwargs)

    probed.__probed__ = real
    worker_dense._leaf = probed


def _seen_by_worker() -> list[int]:
    import tests.cluster.test_task_heap as here

    seen, here._seen[:] = list(here._seen), []
    return seen


def _forget_daemon_settings() -> None:
    from throttler.cluster import worker_settings

    worker_settings._from_daemon.clear()


def _leaf_bodies_saw(client, path: str) -> list[int]:
    workers = sorted(client.scheduler_info()["workers"])
    for w in workers:
        client.submit(dense.dense_leaf, [path], path, pure=False, workers=[w]).result()
    return sorted(sum(client.run(_seen_by_worker).values(), []))


def test_a_dense_leaf_takes_blocks_from_the_heap_on_nanny_workers_unless_the_daemon_says_0(client, tmp_path):
    path = write_sim(tmp_path / "a.parquet", n_paths=20, n_dates=4, shuffle=True)
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}
    assert set(client.run(mapped_on_its_own).values()) == {1}  # outside a task: a mapping of its own
    client.run(_probe_leaf_bodies, True)
    try:
        assert _leaf_bodies_saw(client, path) == [0, 0]
        worker_settings.register(client, load(overrides={"task_mmap_threshold_bytes": 0}, environ={}))
        assert _leaf_bodies_saw(client, path) == [1, 1]
    finally:
        client.unregister_worker_plugin(worker_settings.WorkerSettingsPlugin.name)
        client.run(_forget_daemon_settings)
        client.run(_probe_leaf_bodies, False)
    assert set(client.run(mapped_on_its_own).values()) == {1}  # and after the tasks, the nanny's setting

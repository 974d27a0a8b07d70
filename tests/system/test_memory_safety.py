"""Memory safety on a cluster started the way most Dask clusters are: no ``--resources``.

A real ``dask scheduler``, two ``dask worker --nthreads 2 --memory-limit 2GiB``
processes and nothing else: no ``MEMORY`` resource, no configuration. The daemon
(``throttler serve --scheduler``, a process) gives the workers its own resources
and must run a queue of seed-sized ``groupby`` and ``sum`` groups without one
pause and without one restart.

Why 2 GiB (2048 MiB), from the calibrated model (throttler/planning/memory_model.py)
and its measurements (benchmarks/README.md, calibrate_memory.py):

* the heaviest task of the queue is a ``groupby`` combine of 2 partials of
  6,000,000 rows whose keys differ (the two physical files differ by one path),
  regrouped: modelled at (36 + 2 x 70) B/row + 32 MiB = 1039 MiB, measured at
  995 MiB over an idle worker's 150-160 MiB. Two of them on one 2-thread worker,
  which Dask alone would happily place, hold about 2150 MiB: past the limit.
* one such combine fits what a worker shares among our tasks (0.6 x 2048 MiB
  less the idle RSS, about 1070 MiB), so the groupby groups run one combine per
  worker beside the small tasks of other groups, never two.
* the sum leaves (modelled 810 MiB, measured 558 MiB for 2 files) run one per
  worker as well; two of them would pass Dask's pause (0.8 x 2048 = 1638 MiB).
"""

from __future__ import annotations

import os

from tests.helpers.daemon import Daemon, ExternalCluster, RssSampler, records, serve_args, wait_closed
from tests.helpers.datafiles import assert_matches_reference, write_sim
from throttler.spool.queue import Spool

LIMIT_BYTES = 2 * 2**30
SEED_PATHS, SEED_DATES = 50_000, 120  # 6,000,000 rows a file

#: group -> (strategy, files): hard links alternating between the two physical files
QUEUE = {"gb-a": ("groupby", 4), "gb-b": ("groupby", 3), "sum-a": ("sum", 6), "sum-b": ("sum", 8)}

PAUSE_LINE = "Pausing worker"  # distributed.worker.memory: "Worker is at N% memory usage. Pausing worker."
RESTART_LINE = "memory budget. Restarting"  # the nanny: "exceeded 95% memory budget. Restarting..."


def _estate(tmp_path) -> dict[str, list[str]]:
    """Two physical seed-shaped files with different keys (path 0 in one, path 50,000 in the
    other), hard-linked into every group, alternately."""
    physical = [write_sim(tmp_path / "a.parquet", SEED_PATHS, SEED_DATES, seed=1),
                write_sim(tmp_path / "b.parquet", SEED_PATHS + 1, SEED_DATES, seed=2, drop_paths=(0,))]
    out = {}
    for group, (_, n) in QUEUE.items():
        folder = tmp_path / "data" / group
        folder.mkdir(parents=True)
        out[group] = []
        for i in range(n):
            os.link(physical[i % 2], folder / f"f{i:03d}.parquet")
            out[group].append(str(folder / f"f{i:03d}.parquet"))
    return out


def test_groupby_and_sum_on_workers_without_resources_never_pause_or_restart(tmp_path):
    files = _estate(tmp_path)
    (tmp_path / "cluster").mkdir()
    cluster = ExternalCluster(tmp_path / "cluster", n_workers=2, memory_bytes=LIMIT_BYTES, declare_memory=False,
                              nthreads=2)
    daemon = None
    try:
        client = cluster.connect(2)
        assert all(w["resources"] == {} for w in client.scheduler_info()["workers"].values())  # none declared
        daemon = Daemon(serve_args(tmp_path, cluster.address), tmp_path / "daemon.log")
        daemon.wait_ready()
        sampler = RssSampler([p.pid for p in cluster.procs[1:]])
        spool = Spool(tmp_path / "spool")
        for group, (strategy, _) in QUEUE.items():
            spool.submit(group, strategy=strategy)
        wait_closed(tmp_path / "spool", len(QUEUE), 240, daemon)
        sampled_peak_bytes = sampler.stop()
        events = client.get_events()
        restarts = client.get_events("worker-restart-memory")
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    finally:
        if daemon is not None:
            daemon.kill()
        cluster.close()
    worker_logs = "".join(p.log() for p in cluster.procs[1:])

    done = {r["group"]: r for r in records(tmp_path / "spool", "done")}
    failed = records(tmp_path / "spool", "failed")
    assert failed == [], (failed, daemon.log()[-4000:])
    assert sorted(done) == sorted(QUEUE)
    for group, (strategy, n) in QUEUE.items():
        assert (done[group]["strategy"], done[group]["files"], done[group]["attempts"]) == (strategy, n, 1)
        assert_matches_reference(tmp_path / "out" / f"{group}.parquet", files[group])

    # each worker's own topic (the "all" topic keeps only its last 1000 events)
    per_worker = [msg for topic, log in events.items() if topic.startswith("tcp://") for _, msg in log]
    joined = [m for m in per_worker if m.get("action") == "add-worker"]
    removed = [m for m in per_worker if m.get("action") == "remove-worker"]
    statuses = [m for m in per_worker if m.get("action") == "worker-status-change"]
    # each worker went from init to running once, and never paused
    assert [(m["prev-status"], m["status"]) for m in statuses] == [("init", "running")] * 2, statuses
    assert list(restarts) == [] and len(joined) == 2 and removed == []  # the two first workers, never replaced
    assert worker_logs.count(PAUSE_LINE) == 0 and worker_logs.count(RESTART_LINE) == 0, worker_logs[-3000:]
    assert all(set(r) == {"throttler-memory-bytes", "throttler-solo-bytes", "throttler-worker"}
               for r in resources)  # the daemon's own, and nothing asked of the operator

    fractions = {g: r["worker_peak_fraction"] for g, r in done.items()}
    print(f"worker peak fractions {fractions}; sampled peak {sampled_peak_bytes / LIMIT_BYTES:.3f}")
    assert all(f is not None and f <= 0.75 for f in fractions.values()), fractions
    # the heavy tasks did run: about 1 GiB each, read 0.48 to 0.58 of the limit (an idle worker is under 0.1)
    assert done["gb-a"]["worker_peak_fraction"] > 0.4
    assert sampled_peak_bytes < 0.8 * LIMIT_BYTES, (sampled_peak_bytes, fractions)  # never at pause

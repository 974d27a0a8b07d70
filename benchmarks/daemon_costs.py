"""The daemon's own costs and the scheduler's per-task cost, timed on the real code.

    python benchmarks/daemon_costs.py            # about a minute on 2 cores

Prints one table, the figures :data:`throttler.simulation.calibration.DAEMON_COSTS`
records (and ``throttler simulate`` takes as ``--*-seconds`` flags):

* ``make_plan`` of groups of 2 to 18,000 files (footers already read), fitted
  as a fixed part per group plus a part per file (least squares);
* reading one file's footer (:func:`throttler.planning.footers.file_info`, page cache);
* ``graphs.build`` per task of those groups (the graph the daemon submits);
* one ``admission.choose`` round over 1 to 32 entries, fitted the same way;
* the scheduler's cost per task: no-op tasks through a real ``LocalCluster``
  (2 worker processes), wall time / tasks, with the client in this process.

Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from throttler.admission import policy as admission
from throttler.cluster.snapshot import ClusterShape, ClusterSnapshot, WorkerView
from throttler.commands.generate import EstateSpec, write_estate
from throttler.planning import planner
from throttler.planning.estimator import Estimator
from throttler.planning.footers import file_info
from throttler.planning.plan import FileInfo
from throttler.worker import graphs

GROUP_SIZES = (2, 10, 100, 1000, 18000)
ENTRY_COUNTS = (1, 8, 32)
SHAPE = ClusterShape.uniform(64, 32 * 2**30, 8)


def median_seconds(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def fit(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, the intercept floored at 0."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(0.0, float(intercept)), float(slope)


def plan_costs(repeat: int) -> tuple[float, float, float]:
    """(seconds per group, per file, graph building per task)."""
    file = FileInfo("/data/g/file.parquet", 140_000_000, 6_000_000, 55_600_000)
    plan_s, build_per_task = [], []
    for n in GROUP_SIZES:
        files = [FileInfo(f"/data/g/f{i:05d}.parquet", file.size_bytes, file.rows, file.decoded_bytes)
                 for i in range(n)]
        plan_s.append(median_seconds(lambda: planner.make_plan("g", files, "auto", SHAPE, Estimator()), repeat))
        plan = planner.make_plan("g", files, "auto", SHAPE, Estimator())
        n_tasks = graphs.build(plan, "/out/g.parquet").n_tasks
        build_per_task.append(median_seconds(lambda: graphs.build(plan, "/out/g.parquet"), repeat) / n_tasks)
    group_s, file_s = fit(GROUP_SIZES, plan_s)
    return group_s, file_s, statistics.median(build_per_task)


def footer_seconds(repeat: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        write_estate(Path(tmp), EstateSpec(groups=1, min_files=2, max_files=2, paths=2000, dates=120, seed=0))
        path = str(next(Path(tmp).rglob("*.parquet")))
        return median_seconds(lambda: [file_info(path) for _ in range(100)], repeat) / 100


def round_costs(repeat: int) -> tuple[float, float]:
    """(seconds per admission round, per entry it considers)."""
    workers = tuple(WorkerView(f"w{i}", f"tcp://w{i}", "running", 8, 32 * 2**30, process_bytes=2**28,
                               managed_bytes=0, unmanaged_old_bytes=2**27, memory_budget_bytes=int(0.6 * 32 * 2**30),
                               solo_budget_bytes=int(0.75 * 32 * 2**30)) for i in range(64))
    snapshot = ClusterSnapshot(workers, 0.0)
    files = [FileInfo(f"/d/f{i}.parquet", 140_000_000, 6_000_000, 55_600_000) for i in range(5)]
    plan = planner.make_plan("g", files, "auto", SHAPE, Estimator())
    costs = []
    for n in ENTRY_COUNTS:
        entries = [admission.QueueEntry(dataclasses.replace(plan, group=f"g{i}"), 0, 0.0, f"g{i}#1") for i in range(n)]
        costs.append(median_seconds(lambda: admission.choose(snapshot, [], entries, 1.0), repeat))
    return fit(ENTRY_COUNTS, costs)


def _noop(i):
    return i


def scheduler_seconds_per_task(n_tasks: int, repeat: int) -> float:
    from distributed import Client, LocalCluster, wait
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        wait(client.map(_noop, range(100), pure=False))  # warm up
        return median_seconds(lambda: wait(client.map(_noop, range(n_tasks), pure=False)), repeat) / n_tasks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--tasks", type=int, default=2000, help="no-op tasks per scheduler run")
    args = p.parse_args(argv)
    wall = time.perf_counter()
    group_s, file_s, task_s = plan_costs(args.repeat)
    footer_s = footer_seconds(args.repeat)
    round_s, entry_s = round_costs(args.repeat)
    sched_s = scheduler_seconds_per_task(args.tasks, args.repeat)
    rows = [("group_seconds", group_s, "make_plan, fixed part per group"),
            ("file_seconds (planning)", file_s, "make_plan, part per file"),
            ("footer read per file (not in file_seconds)", footer_s, "estimator.file_info, page cache"),
            ("task_seconds", task_s, "graphs.build per task"),
            ("round_seconds", round_s, "admission.choose, fixed part per round"),
            ("entry_seconds", entry_s, "admission.choose, part per entry"),
            ("scheduler_seconds_per_task", sched_s, f"{args.tasks} no-op tasks, LocalCluster 2 workers")]
    print("| cost | seconds | what was timed |\n|---|---:|---|")
    for name, seconds, what in rows:
        print(f"| {name} | {seconds:.3g} | {what} |")
    print(f"\nmedians of {args.repeat} runs; {time.perf_counter() - wall:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``throttler run``: aggregate some groups now, then exit (for Argo, cron, scripts).

Groups run one after another, each planned for the cluster it runs on and
submitted with per-task MEMORY restrictions when the workers declare them, so a
group larger than the cluster runs in chunks that each fit a worker. ``auto``
falls back from ``aligned`` to ``dense`` (or ``sum`` for sparse keys) when a
group's keys are not aligned.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from distributed import wait

from throttler import graphs, planner, retries
from throttler.cluster import memory_restriction, read_snapshot
from throttler.errors import MisalignedKeys
from throttler.estimator import file_info
from throttler.jobs import worker_peak_fraction
from throttler.output import output_path_for

PROGRESS_EVERY_SECONDS = 2.0


@dataclass
class GroupResult:
    group: str
    ok: bool
    summary: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    strategy: str = ""

    def line(self) -> str:
        if not self.ok:
            return f"FAILED {self.group}: {self.error}"
        s = self.summary
        fraction = worker_peak_fraction(s)
        peak = "" if fraction is None else f", worker peak {fraction:.0%} of its limit"
        return (f"ok     {self.group}: {s['rows']:,} rows from {s['files']} files in {self.seconds:.2f} s "
                f"({self.strategy}, {s['bytes_read'] / 2**20:,.1f} MiB read, {s['nan_count']} NaN{peak}) "
                f"-> {s['output']}")


def run_group(client, catalog, group: str, output_root: str, strategy: str = "auto", *,
              estimator, memory_fraction: float = 0.6, fan_in: int = 8, progress=None) -> GroupResult:
    """Plan, submit and wait for one group; never raises for a per-group problem."""
    started = time.monotonic()
    try:
        summary, used = _run(client, catalog, group, output_root, strategy, estimator, memory_fraction,
                             fan_in, progress)
    except Exception as exc:  # noqa: BLE001 - reported per group
        return GroupResult(group, False, error=retries.describe(exc), seconds=time.monotonic() - started)
    return GroupResult(group, True, summary, seconds=time.monotonic() - started, strategy=used)


def _run(client, catalog, group, output_root, strategy, estimator, memory_fraction, fan_in, progress):
    files = [file_info(p) for p in catalog.files(group)]
    snapshot = read_snapshot(client)
    plan = planner.make_plan(group, files, strategy, snapshot.shape(), estimator,
                             memory_fraction=memory_fraction, fan_in=fan_in)
    label = plan.strategy
    while True:  # auto: aligned -> dense -> sum as keys turn out not aligned, or too sparse
        try:
            return _compute(client, plan, output_root, snapshot, progress), label
        except MisalignedKeys:
            if strategy != "auto" or plan.strategy == "sum":
                raise
        fallback = planner.fallback_strategy(plan.strategy, files)
        plan = planner.make_plan(group, files, fallback, snapshot.shape(), estimator,
                                 memory_fraction=memory_fraction, fan_in=fan_in)
        label = f"{fallback} (keys not aligned)"


def _compute(client, plan, output_root, snapshot, progress) -> dict:
    graph = graphs.build(plan, output_path_for(output_root, plan.group))
    future = client.compute(graph.final, resources=memory_restriction(plan.task_peak_bytes, snapshot))
    started = time.monotonic()
    while not wait(future, timeout=PROGRESS_EVERY_SECONDS).done:
        if progress:
            progress(plan.group, graph.n_tasks - _unfinished(client, graph.key_prefix), graph.n_tasks,
                     time.monotonic() - started)
    return future.result()


def _unfinished(client, prefix: str) -> int:
    def count(dask_scheduler, prefix=prefix):
        return sum(1 for key, ts in dask_scheduler.tasks.items()
                   if isinstance(key, str) and key.startswith(prefix) and ts.state != "memory")
    try:
        return client.run_on_scheduler(count)
    except Exception:  # noqa: BLE001 - progress is best effort
        return 0


def print_progress(group: str, done: int, total: int, elapsed: float) -> None:
    print(f"  ... {group}: {done}/{total} tasks, {elapsed:.0f} s", file=sys.stderr, flush=True)

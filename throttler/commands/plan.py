"""``throttler plan``: a dry run of one group: files, bytes, estimate, chunking, would it fit now."""

from __future__ import annotations

import time

from throttler.admission import policy as admission
from throttler.cluster.scheduler import read_snapshot
from throttler.planning import planner
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.planning.footers import file_infos
from throttler.planning.memory_model import naive_group_bytes
from throttler.planning.plan import FileInfo
from throttler.units import count_of, format_bytes


def read_group(group: str, data_root: str, manifest: str | None) -> tuple[list[FileInfo], float]:
    """The group's files through the catalog, with their footers, and the seconds the footers took.

    Called before any cluster is started or connected: an unknown group or an
    unreadable file ends the command at once (exit 2), as ``run`` does.
    """
    started = time.monotonic()
    files = file_infos(Catalog(data_root, manifest).files(group))
    return files, time.monotonic() - started


def main(group: str, files: list[FileInfo], footers_seconds: float, strategy: str, memory_fraction: float,
         client) -> int:
    """Plan ``files`` (from :func:`read_group`) for the cluster ``client`` sees now and print it."""
    snapshot = read_snapshot(client)
    plan = planner.make_plan(group, files, strategy, snapshot.shape(), Estimator(),
                             memory_fraction=memory_fraction)
    decision = admission.decide(snapshot, [], plan, memory_fraction=memory_fraction, now_seconds=0.0)
    print(f"group {plan.group}: {count_of(plan.n_files, 'file')}, {format_bytes(plan.input_bytes)} on disk, "
          f"naive estimate {format_bytes(naive_group_bytes(files))}; footers read in {footers_seconds:.2f} s")
    print(f"strategy {plan.strategy} (asked {strategy}); {plan.n_leaf_tasks} leaf tasks x "
          f"{plan.files_per_task} files, fan-in {plan.fan_in}")
    print(f"peak per task {format_bytes(plan.task_peak_bytes)}; group reserves {format_bytes(plan.group_peak_bytes)}")
    print(f"fits now: {'yes' if decision.admit else 'no'} ({decision.reason})")
    return 0

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
from throttler.units import format_bytes


def main(group: str, data_root: str, manifest: str | None, strategy: str, memory_fraction: float,
         client) -> int:
    started = time.monotonic()
    files = file_infos(Catalog(data_root, manifest).files(group))
    footers_seconds = time.monotonic() - started
    snapshot = read_snapshot(client)
    plan = planner.make_plan(group, files, strategy, snapshot.shape(), Estimator(),
                             memory_fraction=memory_fraction)
    decision = admission.decide(snapshot, [], plan, memory_fraction=memory_fraction, now_seconds=0.0)
    print(f"group {plan.group}: {plan.n_files} files, {format_bytes(plan.input_bytes)} on disk, "
          f"naive estimate {format_bytes(naive_group_bytes(files))}; footers read in {footers_seconds:.2f} s")
    print(f"strategy {plan.strategy} (asked {strategy}); {plan.n_leaf_tasks} leaf tasks x "
          f"{plan.files_per_task} files, fan-in {plan.fan_in}")
    print(f"peak per task {format_bytes(plan.task_peak_bytes)}; group reserves {format_bytes(plan.group_peak_bytes)}")
    print(f"fits now: {'yes' if decision.admit else 'no'} ({decision.reason})")
    return 0

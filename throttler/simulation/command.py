"""``throttler simulate``: the estate on a modelled cluster, storage included; a table, JSON, a deadline."""

from __future__ import annotations

import time
from dataclasses import replace

from throttler.simulation.bounds import lower_bounds
from throttler.simulation.calibration import DAEMON_COSTS, Calibration
from throttler.simulation.deadline import smallest_cluster
from throttler.simulation.engine import simulate
from throttler.simulation.estate import case_study, from_manifest
from throttler.simulation.model import (
    POLICY_LABELS,
    ModelCluster,
    Scenario,
    Storage,
)
from throttler.simulation.report import as_json, bounds_line, policy_table, write_json

from throttler.simulation.arguments import COST_FLAGS as _COST_FLAGS


def setup(args):
    """(estate, cluster, calibration, scenarios) from the parsed flags."""
    estate = (case_study(args.seed, args.files, args.largest_group) if args.case_study
              else from_manifest(args.manifest, args.data_root))
    storage = Storage(args.storage_bandwidth, args.node_bandwidth, args.request_latency)
    cluster = ModelCluster(args.workers, args.worker_memory, args.threads, storage=storage)
    costs = replace(DAEMON_COSTS, **{k: getattr(args, k) for k in _COST_FLAGS})
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    scenarios = [Scenario(p, strategy=args.strategy, pool_size=args.pool_size, seed=args.seed) for p in policies]
    return estate, cluster, Calibration(daemon=costs), scenarios


def row_label(s: Scenario) -> str:
    return f"{POLICY_LABELS[s.policy]}, {s.pool_size} groups" if s.policy == "fixed-pool" else POLICY_LABELS[s.policy]


def deadline_lines(answers) -> list[str]:
    lines = ["| policy | smallest cluster | makespan s | why not fewer | simulations |", "|---|---:|---:|---|---:|"]
    for text, a in answers:
        size = "none" if a.workers is None else f"{a.workers:,} workers"
        span = "-" if a.makespan_seconds is None else f"{a.makespan_seconds:,.1f}"
        lines.append(f"| {text} | {size} | {span} | {a.reason} | {a.simulations} |")
    return lines


def cmd_simulate(args) -> int:
    wall = time.perf_counter()
    estate, cluster, cal, scenarios = setup(args)
    bounds = lower_bounds(estate, cluster, scenarios[-1], cal)
    rows = [(row_label(s), simulate(estate, cluster, s, cal)) for s in scenarios]
    print(f"Estate: {estate.describe()}.")
    print(f"Cluster: {cluster.n_workers} workers x {cluster.memory_limit_bytes / 2**30:g} GiB x "
          f"{cluster.threads_per_worker} threads; {cluster.storage.describe()}.")
    print(f"Calibration: {cal.describe('aligned')}.\n")
    print(policy_table(rows, bounds))
    print("\n" + bounds_line(bounds))
    deadline = None
    if args.deadline is not None:
        answers = [(row_label(s), smallest_cluster(estate, cluster, s, cal, args.deadline)) for s in scenarios]
        print(f"\nSmallest cluster of {cluster.threads_per_worker}-thread, "
              f"{cluster.memory_limit_bytes / 2**30:g} GiB workers finishing by {args.deadline:,.0f} s:\n")
        print("\n".join(deadline_lines(answers)))
        deadline = {"deadline_seconds": args.deadline,
                    "smallest_workers": {text: a.workers for text, a in answers}}
    if args.json:
        write_json(args.json, as_json(rows, bounds, cluster.storage, deadline))
    print(f"\n{len(rows)} simulations in {time.perf_counter() - wall:.1f} s wall.")
    return 0

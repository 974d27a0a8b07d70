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
    POLICIES,
    POLICY_LABELS,
    ModelCluster,
    Scenario,
    Storage,
    parse_bytes,
    parse_duration,
    parse_rate,
)
from throttler.simulation.report import as_json, bounds_line, policy_table, write_json

_COST_FLAGS = ("group_seconds", "file_seconds", "task_seconds", "round_seconds", "entry_seconds",
               "scheduler_seconds_per_task")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="capacity planning: the estate on a modelled cluster and storage")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV or Parquet: group_id, file (under --data-root), optional bytes")
    src.add_argument("--case-study", action="store_true", help="the seed's ~140,000 files of ~140 MB, seeded")
    p.add_argument("--data-root", help="where the manifest's files are (default: the manifest's directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=140_000, help="case study: files in the estate")
    p.add_argument("--largest-group", type=int, default=18_000, help="case study: files of the largest group")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--threads", type=int, default=8, help="threads of each worker")
    p.add_argument("--worker-memory", type=parse_bytes, default=parse_bytes("32GiB"), help="e.g. 2.5GiB, 16GB")
    p.add_argument("--storage-bandwidth", type=parse_rate, default=float("inf"), help="aggregate, e.g. 12.5GB/s")
    p.add_argument("--node-bandwidth", type=parse_rate, default=float("inf"), help="each worker's link, e.g. 10Gbit/s")
    p.add_argument("--request-latency", type=parse_duration, default=0.0, help="per file read, e.g. 5ms")
    p.add_argument("--strategy", default="auto", choices=("auto", "aligned", "sum", "groupby"))
    p.add_argument("--pool-size", type=int, default=256, help="groups in flight under policy (b)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of " + ", ".join(POLICIES))
    for name in _COST_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(DAEMON_COSTS, name),
                       help="calibrated cost (benchmarks/daemon_costs.py); default %(default)g")
    p.add_argument("--deadline", type=parse_duration, help="print the smallest cluster meeting it, e.g. 30m")
    p.add_argument("--json", help="write the figures to this file")
    p.set_defaults(func=cmd_simulate)


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

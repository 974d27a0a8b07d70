"""The seed's whole estate, simulated: four ways to run it, and how makespan scales with workers.

    python benchmarks/simulate.py                       # 140,000 files, 64 workers x 32 GiB x 8 threads
    python benchmarks/simulate.py --quick               # a 3,000-file estate: a smoke run
    python benchmarks/simulate.py --strategy groupby --peak-noise 0.8,1.3

Drives the real planner, estimator and admission code against a modelled
cluster (see :mod:`throttler.simulate` for the model and its calibration) and
prints markdown tables: the policies side by side on one cluster, then the
throttler as the number of workers doubles. Runs go to ``--jobs`` processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from throttler.planning.planner import resolve_strategy
from throttler.simulate import (
    GIB,
    POLICY_LABELS,
    SIZE_CLASSES,
    Calibration,
    ModelCluster,
    Result,
    Scenario,
    lower_bounds,
    seed_estate,
)

SEED_FILES = 140_000
SEED_LARGEST_GROUP = 18_000
QUICK_FILES = 3_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--memory-gib", type=float, default=32.0, help="memory_limit of each worker")
    p.add_argument("--threads", type=int, default=8, help="threads of each worker")
    p.add_argument("--memory-resource-gib", type=float, default=None,
                   help="MEMORY each worker declares (default: 0.7 x memory_limit, as the embedded cluster)")
    p.add_argument("--files", type=int, default=None, help=f"files in the estate (default {SEED_FILES:,})")
    p.add_argument("--largest-group", type=int, default=None,
                   help="files of the largest group (default: the seed's 18,000 / 140,000 share)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"a {QUICK_FILES:,}-file estate, for smoke runs")
    p.add_argument("--strategy", default="auto", choices=("auto", "aligned", "sum", "groupby"))
    p.add_argument("--pool-sizes", default="16,256", help="groups in flight for the fixed-pool rows")
    p.add_argument("--scaling", default="16,32,64,128", help="worker counts of the scaling table ('' for none)")
    p.add_argument("--scheduler-ms", type=float, default=None, help="scheduler cost per task (default 1 ms)")
    p.add_argument("--peak-noise", default=None,
                   help="LO,HI: add a throttler row whose true task peaks are the model x U(LO, HI)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    return p.parse_args(argv)


def estate(args) -> list[int]:
    files = args.files or (QUICK_FILES if args.quick else SEED_FILES)
    largest = args.largest_group or max(10, round(files * SEED_LARGEST_GROUP / SEED_FILES))
    return seed_estate(files, seed=args.seed, max_files=largest)


def cluster_for(args, workers: int) -> ModelCluster:
    resource = None if args.memory_resource_gib is None else int(args.memory_resource_gib * GIB)
    return ModelCluster(workers, int(args.memory_gib * GIB), args.threads, resource)


def calibration(args) -> Calibration:
    cal = Calibration()
    if args.scheduler_ms is not None:
        cal = replace(cal, scheduler_seconds_per_task=args.scheduler_ms / 1000)
    return cal


def scenarios(args) -> list[tuple[str, Scenario]]:
    """(row label, scenario) of the policy table."""
    base = dict(strategy=args.strategy, seed=args.seed)
    rows = [(POLICY_LABELS["all-at-once"], Scenario("all-at-once", **base))]
    for n in (int(x) for x in args.pool_sizes.split(",") if x.strip()):
        rows.append((f"{POLICY_LABELS['fixed-pool']}, {n} groups", Scenario("fixed-pool", pool_size=n, **base)))
    rows.append((POLICY_LABELS["resources"], Scenario("resources", **base)))
    rows.append((POLICY_LABELS["throttler"], Scenario("throttler", **base)))
    if args.peak_noise:
        lo, hi = (float(x) for x in args.peak_noise.split(","))
        rows.append((f"{POLICY_LABELS['throttler']}, true peaks x U({lo:g}, {hi:g})",
                     Scenario("throttler", peak_noise=(lo, hi), **base)))
    return rows


def _simulate(job):
    from throttler.simulate import simulate
    sizes, cluster, scenario, cal = job
    return simulate(sizes, cluster, scenario, cal)


def _bounds(job):
    sizes, cluster, scenario, cal = job
    return lower_bounds(sizes, cluster, scenario, cal)


# --------------------------------------------------------------------------- tables


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.0f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.1f}"


def header(args, sizes: list[int], cal: Calibration, strategy: str) -> str:
    big = max(sizes)
    return "\n".join([
        f"Estate: {sum(sizes):,} files of {cal.file_rows:,} rows in {len(sizes):,} groups of "
        f"{min(sizes)} to {big:,} files (seed {args.seed}); all groups queued at time 0.",
        f"Calibration ({strategy}): {cal.describe(strategy)}.",
        "Memory: throttler.planning.estimator's per-row model; Dask thresholds pause 0.8, kill 0.95 of memory_limit, "
        "3 allowed failures; admission capacity = memory_limit x 0.6 per worker.",
    ])


def policy_table(rows: list[tuple[str, Result]], bounds) -> str:
    lb = bounds.lower_bound_seconds
    lines = [
        "| policy | makespan s | x lower bound | utilisation | groups done | failed | stuck | worker kills "
        "| paused worker-s | peak held / capacity | peak worker / limit | peak reserved / capacity "
        "| biggest group starts at s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        reserved = f"{r.peak_reserved_bytes / r.capacity_bytes:.2f}" if r.policy == "throttler" else "-"
        lines.append(
            f"| {label} | {r.makespan_seconds:,.1f} | {r.makespan_seconds / lb:.2f} | {r.utilisation:.0%} "
            f"| {r.completed:,} | {r.failed:,} | {r.stuck:,} | {r.kills:,} | {r.paused_worker_seconds:,.0f} "
            f"| {r.peak_held_bytes / r.capacity_bytes:.2f} | {r.peak_worker_fraction:.2f} | {reserved} "
            f"| {_s(r.biggest_group_start_seconds)} |")
    lines.append("")
    if any(r.failed or r.stuck for _, r in rows):
        lines.append("A row with failed or stuck groups did less than the whole batch: its makespan can "
                     "fall below the lower bound.")
    lines.append(f"Lower bound {lb:,.1f} s = max(work / threads {bounds.work_bound_seconds:,.1f} s, longest group "
                 f"alone {bounds.critical_path_seconds:,.1f} s, scheduler {bounds.tasks:,} tasks "
                 f"{bounds.scheduler_bound_seconds:,.1f} s, memory {bounds.memory_bound_seconds:,.1f} s).")
    return "\n".join(lines)


def wait_table(rows: list[tuple[str, Result]]) -> str:
    classes = [label for label, _, _ in SIZE_CLASSES]
    lines = ["| policy | " + " | ".join(f"{c} files" for c in classes) + " | longest admission wait s |",
             "|---|" + "---:|" * (len(classes) + 1)]
    for label, r in rows:
        cells = []
        for c in classes:
            w = r.start_delay.get(c)
            cells.append("-" if w is None else f"{w.p50_seconds:,.1f} / {w.max_seconds:,.1f} (n={w.groups:,})")
        queued = r.policy in ("fixed-pool", "throttler")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_s(r.max_admission_wait_seconds if queued else None)} |")
    return "\n".join(lines)


def scaling_table(results: list[tuple[ModelCluster, Result, object]]) -> str:
    lines = [
        "| workers | threads | admission capacity GiB | makespan s | utilisation | x lower bound "
        "| work / threads s | scheduler s | memory s | worker kills | failed | biggest group starts at s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cluster, r, b in results:
        lines.append(
            f"| {cluster.n_workers} | {cluster.threads:,} | {_gib(r.capacity_bytes)} | {r.makespan_seconds:,.1f} "
            f"| {r.utilisation:.0%} | {r.makespan_seconds / b.lower_bound_seconds:.2f} "
            f"| {b.work_bound_seconds:,.1f} | {b.scheduler_bound_seconds:,.1f} | {b.memory_bound_seconds:,.1f} "
            f"| {r.kills} | {r.failed + r.stuck} | {_s(r.biggest_group_start_seconds)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    sizes, cal = estate(args), calibration(args)
    rows = scenarios(args)
    throttler_scenario = next(s for label, s in rows if s.policy == "throttler")
    workers = [int(x) for x in args.scaling.split(",") if x.strip()]
    scale_clusters = [cluster_for(args, n) for n in workers]
    main_cluster = cluster_for(args, args.workers)
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        scale_runs = {c.n_workers: pool.submit(_simulate, (sizes, c, throttler_scenario, cal))
                      for c in scale_clusters if c.n_workers != args.workers}
        policy_runs = [(label, pool.submit(_simulate, (sizes, main_cluster, s, cal))) for label, s in rows]
        bounds = {c.n_workers: pool.submit(_bounds, (sizes, c, throttler_scenario, cal))
                  for c in scale_clusters + [main_cluster]}
        policy_results = [(label, f.result()) for label, f in policy_runs]
        main_throttler = next(r for label, r in policy_results if label == POLICY_LABELS["throttler"])
        scale = [(c, main_throttler if c.n_workers == args.workers else scale_runs[c.n_workers].result(),
                  bounds[c.n_workers].result()) for c in scale_clusters]
        main_bounds = bounds[args.workers].result()
    strategy = args.strategy if args.strategy != "auto" else resolve_strategy("auto", [cal.file_info()])[0]
    print(header(args, sizes, cal, strategy))
    print()
    print(f"## Policies on {args.workers} workers x {args.memory_gib:g} GiB x {args.threads} threads "
          f"({main_cluster.threads:,} threads), strategy {args.strategy}")
    print()
    print(policy_table(policy_results, main_bounds))
    print()
    print("### Start delay by group size: time 0 to the group's first task, p50 / max seconds "
          "(admission wait: from entering the admission window, or the pool's queue, to submission)")
    print()
    print(wait_table(policy_results))
    if scale:
        print()
        print(f"## Scaling: the throttler on N workers x {args.memory_gib:g} GiB x {args.threads} threads")
        print()
        print(scaling_table(scale))
    n_runs = len(policy_results) + len(scale_runs)
    cpu = time.process_time()
    print()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += children.ru_utime + children.ru_stime
    print(f"{n_runs} simulations and {len(bounds)} bound computations in {time.perf_counter() - wall:.1f} s "
          f"wall, {cpu:.1f} s CPU in {args.jobs} processes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

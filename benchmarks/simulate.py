"""The case study's whole estate, simulated with storage: four ways to run it at several bandwidths.

    python benchmarks/simulate.py                          # 64 workers x 32 GiB x 8 threads, 5 / 12.5 / 50 GB/s
    python benchmarks/simulate.py --bandwidths 12.5 --node-bandwidth 25Gbit/s
    python benchmarks/simulate.py --calibration-check 9.7  # batch.py's measured (d) makespan, to compare

Drives the real planner, estimator and admission through :mod:`throttler.simulation`
(the model, its calibration and its lower bounds are described there) and
prints one markdown table per storage bandwidth, with the resource that
bounds the run and the wall time of each simulation.

``--calibration-check SECONDS`` simulates the estate and cluster of
``python benchmarks/batch.py --strategy auto --ways a,d --files 300 --largest 64``
(2 workers x 4 GB x 1 thread, 302 files of 50.4 MB in 32 groups, page cache
warm: storage not limiting) and prints the simulated makespan beside the
measured one given.
"""

from __future__ import annotations

import argparse
import sys
import time

from throttler.simulation.bounds import lower_bounds
from throttler.simulation.calibration import Calibration
from throttler.simulation.engine import simulate
from throttler.simulation.estate import case_study, seed_sizes, uniform_estate
from throttler.simulation.model import (
    POLICY_LABELS,
    ModelCluster,
    Scenario,
    Storage,
    parse_bytes,
    parse_rate,
)
from throttler.simulation.report import bounds_line, policy_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--worker-memory", type=parse_bytes, default=parse_bytes("32GiB"))
    p.add_argument("--bandwidths", default="5,12.5,50", help="aggregate storage GB/s, one table each")
    p.add_argument("--node-bandwidth", type=parse_rate, default=parse_rate("10Gbit/s"))
    p.add_argument("--strategy", default="auto")
    p.add_argument("--pool-sizes", default="16,256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-check", type=float, metavar="SECONDS",
                   help="only compare with batch.py's measured makespan of its 300-file run")
    return p.parse_args(argv)


def scenarios(args) -> list[tuple[str, Scenario]]:
    base = dict(strategy=args.strategy, seed=args.seed)
    rows = [(POLICY_LABELS["all-at-once"], Scenario("all-at-once", **base))]
    for n in (int(x) for x in args.pool_sizes.split(",") if x.strip()):
        rows.append((f"{POLICY_LABELS['fixed-pool']}, {n} groups", Scenario("fixed-pool", pool_size=n, **base)))
    rows += [(POLICY_LABELS["resources"], Scenario("resources", **base)),
             (POLICY_LABELS["throttler"], Scenario("throttler", **base))]
    return rows


def calibration_check(measured_seconds: float) -> None:
    """batch.py's 300-file estate on its cluster: 2 workers x 4 GB x 1 thread, files of 50.4 MB."""
    estate = uniform_estate(seed_sizes(300, seed=0, max_files=64), file_bytes=50_400_000, source="batch.py --files 300")
    cluster = ModelCluster(2, 4_000_000_000, 1, memory_resource_bytes=4_000_000_000)
    print(f"Estate: {estate.describe()}; cluster 2 workers x 4 GB x 1 thread, storage not limiting.\n")
    print("| policy | simulated makespan s | measured (batch.py) s | simulated / measured |\n|---|---:|---:|---:|")
    for policy in ("all-at-once", "throttler"):
        r = simulate(estate, cluster, Scenario(policy))
        print(f"| {POLICY_LABELS[policy]} | {r.makespan_seconds:.1f} | {measured_seconds:.1f} "
              f"| {r.makespan_seconds / measured_seconds:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.calibration_check:
        calibration_check(args.calibration_check)
        return 0
    started = time.perf_counter()
    estate, cal = case_study(args.seed), Calibration()
    print(f"Estate: {estate.describe()}. Cluster: {args.workers} workers x {args.worker_memory / 2**30:g} GiB x "
          f"{args.threads} threads, each on a {args.node_bandwidth / 1e9:g} GB/s link.")
    for gbps in (float(x) for x in args.bandwidths.split(",") if x.strip()):
        storage = Storage(gbps * 1e9, args.node_bandwidth)
        cluster = ModelCluster(args.workers, args.worker_memory, args.threads, storage=storage)
        rows, walls = [], []
        for text, s in scenarios(args):
            r = simulate(estate, cluster, s, cal)
            rows.append((text, r))
            walls.append(f"{text} {r.wall_seconds:.1f} s")
        bounds = lower_bounds(estate, cluster, Scenario("throttler", strategy=args.strategy), cal)
        print(f"\n## Storage {gbps:g} GB/s aggregate\n")
        print(policy_table(rows, bounds))
        print("\n" + bounds_line(bounds))
        print("Wall time of each simulation: " + "; ".join(walls) + ".")
    print(f"\nwhole benchmark: {time.perf_counter() - started:.1f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())

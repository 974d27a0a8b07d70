"""A ratio that holds on a noisy machine: two methods in alternating processes, paired.

    python benchmarks/paired.py                                # leaves and kernels against the floor
    python benchmarks/paired.py --a aligned-leaves --pairs 11 --rounds 30
    python benchmarks/paired.py --a aligned-cluster-compute,aligned-cluster   # through a LocalCluster
    python benchmarks/paired.py --a dense-cluster@mixed --b aligned-cluster@aligned --pairs 7 --rounds 10
    python benchmarks/paired.py --a dense-cluster@shuffled --b dense-cluster@shuffled \
        --b-env THROTTLER_TASK_MMAP_THRESHOLD_BYTES=0    # one setting against another
    python benchmarks/paired.py --a dense-cluster@shuffled --b duckdb@shuffled --idle-seconds 3   # idle workers

Sub-second timings on a shared VM drift by tens of percent between one table and
the next, more than the gaps being measured. This script runs method A and
method B in turn, each in a fresh process (A, B, A, B, ...); each process runs
its method ``--rounds`` times over the same group (the files of
``benchmarks/aggregate.py``, generated there) and reports the compute seconds
timed inside it, after imports and one untimed warm-up round. The ratio A/B is
taken pair by pair, so a drift of the machine's speed hits both sides of a
pair alike; the table gives the median ratio with its spread. ``METHOD@LAYOUT``
runs a method on one of aggregate.py's layouts (``aligned``, ``shuffled``,
``mixed``, ``shuffled-nocrc``; default ``aligned``), as aggregate.py's methods take it. ``--a-env`` and
``--b-env`` (``NAME=VALUE``, repeatable) set environment variables of one side's
processes (and of their cluster's workers, which inherit them). ``--idle-seconds``
pauses before each timed round, untimed (a daemon whose groups arrive apart:
on a VM that hands freed memory back to its host, memory idle for a second or
two must be faulted in again). The cluster
methods start aggregate.py's LocalCluster (2 workers x 1 thread) once per
process, so their rounds measure warm workers, as a long-running daemon has.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aggregate  # noqa: E402 - the same data and the same method bodies

DEFAULT_B = "floor"
DEFAULT_A = "aligned-leaves,aligned-kernels"


IN_PROCESS = ("floor", "aligned-leaves", "aligned-kernels", "duckdb")
#: aggregate.py's LocalCluster, 2 x 1 thread
ON_CLUSTER = ("aligned-cluster-compute", "aligned-cluster", "dense-cluster")


def method_body(name: str, files: list[str], work: str, client=None):
    """A no-argument callable doing one round of ``name`` (the bodies of aggregate.py's methods).

    The cluster bodies build a new graph each round (fresh keys: nothing is
    reused from the round before) and wait for the final task's summary; the
    output file of ``aligned-cluster`` is written, fsynced and renamed each time.
    """
    from throttler.worker import graphs, kernels

    per = aggregate.FILES_PER_TASK
    chunks = [files[i:i + per] for i in range(0, len(files), per)]
    resources = {"MEMORY": aggregate.TASK_MEMORY_BYTES}
    plan = aggregate.throttler_plan(files, "aligned")
    dense_plan = aggregate.throttler_plan(files, "dense")
    output = str(Path(work) / "aligned-paired.parquet")
    bodies = {
        "floor": lambda: aggregate.add_value_columns(files),
        "duckdb": lambda: _duckdb_group_by(files),
        "aligned-leaves": lambda: kernels.aligned_combine([kernels.aligned_leaf(c, files[0]) for c in chunks]),
        "aligned-kernels": lambda: kernels.aligned_result([kernels.aligned_leaf(c, files[0]) for c in chunks],
                                                          files[0]),
        "aligned-cluster-compute": lambda: client.compute(aggregate.no_write_graph(files),
                                                          resources=resources).result(),
        "aligned-cluster": lambda: client.compute(graphs.build(plan, output).final, resources=resources).result(),
        "dense-cluster": lambda: client.compute(graphs.build(dense_plan, output).final,
                                                resources=resources).result(),
    }
    return bodies[name]


def _duckdb_group_by(files: list[str]):
    """aggregate.py's DuckDB query (GROUP BY over read_parquet, all threads), on a new connection."""
    import duckdb

    query = 'SELECT path, "Date", sum(value) AS value FROM read_parquet($files) GROUP BY path, "Date"'
    with duckdb.connect() as con:
        return con.sql(query, params={"files": files}).to_arrow_table()


def child_main(args) -> None:
    work = Path(args.data) / "out"
    work.mkdir(parents=True, exist_ok=True)
    name, _, layout = args.child.partition("@")
    with contextlib.ExitStack() as stack:
        client = None
        if name in ON_CLUSTER:
            client = stack.enter_context(aggregate.local_cluster())
            aggregate.warm_like_the_daemon(client, name.split("-")[0])
        body = method_body(name, aggregate.group_files(args, layout or "aligned"), str(work), client)
        body()  # warm-up, untimed
        seconds = 0.0
        for _ in range(args.rounds):
            time.sleep(args.idle_seconds)
            started = time.perf_counter()
            body()
            seconds += time.perf_counter() - started
        print(json.dumps({"seconds": seconds / args.rounds}))


def run_child(method: str, args, env_pairs: list[str] = ()) -> float:
    env = {**os.environ, **dict(pair.split("=", 1) for pair in env_pairs)}
    argv = [sys.executable, __file__, "--child", method, "--rounds", str(args.rounds), "--data", args.data,
            "--idle-seconds", str(args.idle_seconds),
            "--files", str(args.files), "--paths", str(args.paths), "--dates", str(args.dates)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=900, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def parent_main(args) -> None:
    methods = args.a.split(",") + [args.b]
    unknown = [m for m in methods if m.partition("@")[0] not in IN_PROCESS + ON_CLUSTER]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(IN_PROCESS + ON_CLUSTER)}")
    files = aggregate.ensure_data(args)
    for layout in {m.partition("@")[2] or "aligned" for m in methods}:
        files = aggregate.ensure_layout(args, layout)
        aggregate.warm_page_cache(files)
    rows = []
    for a in args.a.split(","):
        ratios, a_times, b_times = [], [], []
        for pair in range(args.pairs):
            a_s, b_s = run_child(a, args, args.a_env), run_child(args.b, args, args.b_env)
            a_times.append(a_s)
            b_times.append(b_s)
            ratios.append(a_s / b_s)
            print(f"  pair {pair + 1}/{args.pairs}  {a} {a_s:.3f} s  {args.b} {b_s:.3f} s  ratio {ratios[-1]:.3f}",
                  file=sys.stderr, flush=True)
        rows.append((a, statistics.median(a_times), statistics.median(b_times), ratios))
    print(f"{len(files)} files x {args.paths * args.dates:,} rows; {args.pairs} pairs of processes, "
          f"A then B; each process {args.rounds} timed rounds after a warm-up"
          f"{f', each after {args.idle_seconds:g} s idle' if args.idle_seconds else ''}; seconds per round.")
    print()
    print("| A | B | A s (median) | B s (median) | A/B per pair: median | min-max |")
    print("|---|---|---:|---:|---:|---:|")
    for a, a_med, b_med, ratios in rows:
        a_label, b_label = " ".join([a, *args.a_env]), " ".join([args.b, *args.b_env])
        print(f"| {a_label} | {b_label} | {a_med:.3f} | {b_med:.3f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.3f}-{max(ratios):.3f} |")
    print(f"\ncommand: python benchmarks/paired.py {' '.join(sys.argv[1:])}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default=DEFAULT_A, help="comma-separated methods to compare with B")
    p.add_argument("--b", default=DEFAULT_B)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds in each process")
    p.add_argument("--idle-seconds", type=float, default=0.0,
                   help="untimed pause before each timed round (a daemon's workers idle between groups)")
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--paths", type=int, default=50_000)
    p.add_argument("--dates", type=int, default=120)
    p.add_argument("--data", default=str(aggregate.DEFAULT_DATA))
    p.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable of A's processes (repeatable)")
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable of B's processes (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    child_main(arguments) if arguments.child else parent_main(arguments)

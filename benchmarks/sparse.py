"""Both sides of the planner's sparse-keys threshold: ``dense`` against ``sum`` as the grid thins out.

    python benchmarks/sparse.py                       # 2 files x 1.8M rows, 3 runs
    python benchmarks/sparse.py --paths 2000 --runs 1 # quick smoke run

Each group has 2 shuffled files of ``--paths`` x 120 rows whose path IDs are
``0, s, 2s, ...``: the grid has ``s / 2`` cells per input row of the group
(``planner.SPARSE_CELLS_PER_ROW`` is the threshold). Each (spacing, strategy) runs
in a fresh process on dask's synchronous scheduler, output written, timed on its
second call (the first pays for imports and first allocations); the table gives
medians of ``--runs`` runs after one warm-up, and each child's peak RSS (both calls).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CELLS_PER_ROW = (1, 4, 8, 16, 32)
N_DATES = 120
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "bench-data" / "sparse"  #: git-ignored


def group_paths(args, cells_per_row: int) -> list[str]:
    directory = Path(args.data) / f"{args.paths}x{N_DATES}-c{cells_per_row}"
    paths = [str(directory / f"f{i}.parquet") for i in range(2)]
    if not all(os.path.exists(p) for p in paths):
        directory.mkdir(parents=True, exist_ok=True)
        from throttler.commands.generate import simulation_dates

        dates = simulation_dates(N_DATES, 0)
        for i, path in enumerate(paths):
            rng = np.random.default_rng(i)
            ids = np.arange(args.paths, dtype=np.int64) * (2 * cells_per_row)
            order = rng.permutation(args.paths * N_DATES)
            table = pa.table({"path": np.repeat(ids, N_DATES)[order],
                              "Date": pa.array(np.tile(dates, args.paths)[order], pa.date32()),
                              "value": rng.standard_normal(args.paths * N_DATES)})
            pq.write_table(table, path + ".tmp")
            os.replace(path + ".tmp", path)
    return paths


def child(args) -> None:
    from tests.helpers.datafiles import plan_for
    from throttler.worker import graphs

    paths = group_paths(args, args.cells_per_row)
    out = os.path.join(os.path.dirname(paths[0]), f"out-{args.strategy}.parquet")
    plan = plan_for("g", paths, args.strategy, files_per_task=2, fan_in=2)
    graphs.build(plan, out).final.compute(scheduler="sync")  # untimed: imports, pools, first allocations
    started = time.perf_counter()
    summary = graphs.build(plan, out).final.compute(scheduler="sync")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rows": summary["rows"],
                      "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run(args, cells_per_row: int, strategy: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--strategy", strategy, "--paths",
           str(args.paths), "--data", args.data, "--cells-per-row", str(cells_per_row)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args) -> None:
    rows = []
    for c in CELLS_PER_ROW:
        group_paths(args, c)
        results = {}
        for strategy in ("dense", "sum"):
            reports = [run(args, c, strategy) for _ in range(args.runs + 1)][1:]
            results[strategy] = (statistics.median(r["seconds"] for r in reports),
                                 statistics.median(r["rss_bytes"] for r in reports), reports[0]["rows"])
            print(f"  {c:3d} cells/row {strategy:6s} {results[strategy][0]:.3f} s", file=sys.stderr, flush=True)
        rows.append((c, results))
    print(f"2 shuffled files x {args.paths * N_DATES:,} rows; each cell of the table a median of {args.runs} "
          "fresh processes (dask sync scheduler, output written, second call timed).\n")
    print("| grid cells per input row | dense s | sum s | sum / dense | dense peak RSS MiB | sum peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, r in rows:
        print(f"| {c} | {r['dense'][0]:.3f} | {r['sum'][0]:.3f} | {r['sum'][0] / r['dense'][0]:.2f} | "
              f"{r['dense'][1] / 2**20:,.0f} | {r['sum'][1] / 2**20:,.0f} |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=15_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--cells-per-row", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    child(arguments) if arguments.child else main(arguments)

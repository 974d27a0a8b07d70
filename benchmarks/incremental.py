"""Incremental runs (issue 17): a large group run again after one new file lands.

    python benchmarks/incremental.py                      # 400 files, 3 runs of the short cases
    python benchmarks/incremental.py --files 2000 --runs 3

The group is ``--files`` hard links of 3 seed-sized physical files (50,000
paths x 120 dates, 6,000,000 rows each, written as ``throttler generate``
writes them). Every case is a ``throttler run`` of one group through the
service (:func:`throttler.commands.run.run_groups`) in a fresh child process
with its own embedded cluster (2 workers x 1 thread, 4 GB each); the time is
the done record's ``total_seconds`` (claim to record: fingerprints, footers,
planning, the run and the write), taken after the cluster started. The cases,
each prepared by the parent on disk:

* ``full N``: the first run of the N-file group (no previous output);
* ``unchanged N``: the same group run again with nothing new (fingerprints
  only: no plan, no cluster work, the output untouched);
* ``incremental N+1``: the same group after one new file landed, its previous
  output in place (restored before each run);
* ``full 2``: a 2-file group's first run, the floor the incremental run is
  compared with (read the previous output and one file, write the output);
* ``rewrite 1 of N+1``: one file of the group replaced by other content: a full run.

The page cache is warm (every physical file read once before the cases).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SEED_PATHS, SEED_DATES = 50_000, 120
N_PHYSICAL = 3
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "bench-data" / "incremental"  #: git-ignored


def _physical(data: Path) -> list[Path]:
    from throttler.commands.generate import simulation_dates, simulation_table

    data.mkdir(parents=True, exist_ok=True)
    dates = simulation_dates(SEED_DATES, 0)
    files = []
    for i in range(N_PHYSICAL):
        target = data / f"physical-{i}.parquet"
        if not target.exists():
            pq.write_table(simulation_table(SEED_PATHS, dates, np.random.default_rng(i)), target,
                           write_page_checksum=True)
        target.read_bytes()  # warm the page cache
        files.append(target)
    return files


def _group(root: Path, name: str, physical: list[Path], n: int) -> Path:
    group = root / name
    shutil.rmtree(group, ignore_errors=True)
    group.mkdir(parents=True)
    for i in range(n):
        os.link(physical[i % 2], group / f"f{i:05d}.parquet")  # physical 2 is kept for new content
    return group


def _child(root: Path, out: Path, group: str) -> dict:
    cmd = [sys.executable, __file__, "--child", group, "--root", str(root), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if done.returncode:
        raise SystemExit(f"child failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(root: str, out: str, group: str) -> None:
    """One ``throttler run`` of ``group`` in this process; prints the done record's figures."""
    from throttler.cluster.embedded import start_embedded_cluster
    from throttler.commands import run
    from throttler.commands.progress_display import ProgressDisplay, choose_mode
    from throttler.config import load

    cluster, client = start_embedded_cluster(4_000_000_000, 2, threads_per_worker=1)
    cfg = load(overrides={"data_root": root, "output": out, "metrics_address": None}, environ={})
    results = run.run_groups(cfg, client, [group], "auto", ProgressDisplay(choose_mode(True), 60),
                             print_line=lambda line: print(line, file=sys.stderr))
    kind, record = results.records[0]
    client.close()
    cluster.close()
    if kind != "done":
        raise SystemExit(record["reason"])
    print(json.dumps({k: record[k] for k in ("total_seconds", "seconds", "run_kind", "run_reason", "files_read",
                                             "files", "strategy", "bytes")}))


def _cases(args, physical: list[Path]) -> list[tuple[str, list[dict]]]:
    root, out = Path(args.data) / "root", Path(args.data) / "out"
    out.mkdir(parents=True, exist_ok=True)
    n = args.files
    group = _group(root, "big", physical, n)
    for stale in out.glob("*.parquet"):
        stale.unlink()
    full_n = [_child(root, out, "big")]
    written_ns = (out / "big.parquet").stat().st_mtime_ns
    unchanged = [_child(root, out, "big") for _ in range(args.runs)]
    if (out / "big.parquet").stat().st_mtime_ns != written_ns:
        raise SystemExit("an unchanged run rewrote the output")
    saved = Path(args.data) / "big-after-full.parquet"
    shutil.copy2(out / "big.parquet", saved)
    os.link(physical[2], group / f"f{n:05d}.parquet")  # one new file lands
    incremental = []
    for _ in range(args.runs):
        shutil.copy2(saved, out / "big.parquet")
        incremental.append(_child(root, out, "big"))
    after_new = Path(args.data) / "big-after-incremental.parquet"
    shutil.copy2(out / "big.parquet", after_new)
    _group(root, "two", physical, 2)
    floor = []
    for _ in range(args.runs):
        (out / "two.parquet").unlink(missing_ok=True)
        floor.append(_child(root, out, "two"))
    victim = group / "f00000.parquet"
    victim.unlink()
    shutil.copy(physical[2], victim)  # other content under the same name
    rewrite = [_child(root, out, "big")]
    victim.unlink()
    os.link(physical[0], victim)
    return [(f"full, {n} files (first run)", full_n), (f"unchanged, {n} files (nothing new)", unchanged),
            (f"incremental, {n + 1} files (1 new)", incremental),
            ("full, 2 files (the floor)", floor), (f"rewrite 1 of {n + 1} files (full)", rewrite)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--runs", type=int, default=3, help="runs of the short cases (the full ones run once)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--child")
    p.add_argument("--root")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.child:
        return run_child(args.root, args.out, args.child)
    cases = _cases(args, _physical(Path(args.data)))
    floor = statistics.median(r["total_seconds"] for r in cases[3][1])
    print(f"{args.files} hard-linked seed-sized files (6,000,000 rows each), 2 workers x 1 thread; "
          f"medians of the runs; time = claim to done record")
    print("| case | run | files read | MiB read | seconds (median) | runs | x full 2-file run |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, records in cases:
        secs = statistics.median(r["total_seconds"] for r in records)
        r = records[0]
        print(f"| {name} | {r['run_kind']} ({r['strategy']}) | {r['files_read']} | {r['bytes'] / 2**20:,.0f} | "
              f"{secs:.2f} | {len(records)} | {secs / floor:.2f} |")


if __name__ == "__main__":
    main()

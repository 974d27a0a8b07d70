"""Incremental runs on object storage: a group on a loopback S3 server (moto_server), run as it changes.

    python benchmarks/incremental_s3.py [--files 100]

The group is ``--files`` objects (copies of 2 files of 50,000 paths x 12 dates,
600,000 rows each) under ``s3://bench/data/big/``; the output goes to
``s3://bench/out/``. Every case is a ``throttler run`` of one group in a fresh
child process with its own embedded cluster (``benchmarks/incremental.py
--child``: 2 workers x 1 thread), one run each: the first (full) run, a run
with nothing new (unchanged), a run after one new object landed (incremental),
a 2-file group's full run (the floor), and a run after one object was
rewritten (full). Per case: the done record's time (claim to record) and the
HTTP requests the server logged, by kind.

What a loopback server cannot tell: real round trips (tens of ms to a cloud
store, under 1 ms here), throttling and bandwidth; the request counts carry
over, the seconds do not. The one moto process is itself the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers.datafiles import write_sim
from tests.helpers.s3_server import count_requests, logged_server

INCREMENTAL = Path(__file__).resolve().parent / "incremental.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100)
    opts = p.parse_args()
    with logged_server() as (server, log_path):  # its access log counts the requests
        run(server, opts.files, log_path)


def run(server, n: int, log_path: str) -> None:
    s3 = server.client()
    s3.create_bucket(Bucket="bench")
    local = Path(tempfile.mkdtemp(prefix="incr-s3-"))
    sources = [write_sim(local / f"p{i}.parquet", 50_000, 12, seed=i) for i in range(3)]
    for i in range(n):
        s3.upload_file(sources[i % 2], "bench", f"data/big/f{i:05d}.parquet")
    for i in range(2):
        s3.upload_file(sources[i], "bench", f"data/two/f{i:05d}.parquet")
    cases = [("full, first run", "big", None)]
    cases.append(("unchanged (nothing new)", "big", None))
    cases.append(("incremental (1 new)", "big", lambda: s3.upload_file(sources[2], "bench", f"data/big/f{n:05d}.parquet")))
    cases.append(("full, 2 files (the floor)", "two", None))
    cases.append(("rewrite 1 (full)", "big", lambda: s3.upload_file(sources[2], "bench", "data/big/f00000.parquet")))
    print(f"{n} objects of {os.path.getsize(sources[0]) / 2**20:.1f} MiB (600,000 rows) on a loopback moto_server; "
          "one run each; time = claim to done record")
    print("| case | run | files | files read | seconds | GET | HEAD | PUT (incl. copy) | DELETE | other |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, group, change in cases:
        if change is not None:
            change()
        before = count_requests(log_path)
        record = _child(group)
        counts = count_requests(log_path) - before
        other = sum(counts.values()) - sum(counts[k] for k in ("GET", "HEAD", "PUT", "DELETE"))
        print(f"| {name} | {record['run_kind']} | {record['files']} | {record['files_read']} | "
              f"{record['total_seconds']:.2f} | {counts['GET']} | {counts['HEAD']} | {counts['PUT']} | "
              f"{counts['DELETE']} | {other} |")


def _child(group: str) -> dict:
    cmd = [sys.executable, str(INCREMENTAL), "--child", group, "--root", "s3://bench/data", "--out", "s3://bench/out"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "PYTHONPATH": str(INCREMENTAL.parent.parent)})
    if done.returncode:
        raise SystemExit(f"child failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

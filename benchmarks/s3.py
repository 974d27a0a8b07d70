"""Footers of a many-file group on a loopback S3 server (moto_server) beside local disk.

    python benchmarks/s3.py [--files 2000] [--repeats 3]

Prints, per storage and method, the median seconds to read every footer
(``footers.file_infos``: concurrent on a store; ``file_info`` one by one for
comparison) and the HTTP requests the server logged per file. What a loopback
server cannot tell: real round-trip latency (tens of ms to a cloud store, under
1 ms here), throttling (503 SlowDown), per-request cost and link bandwidth; the
request count per file and the concurrency's ratio to the serial read carry
over, the seconds do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers.datafiles import write_sim  # noqa: E402
from tests.helpers.s3_server import S3Server  # noqa: E402


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--files", type=int, default=2000)
    args.add_argument("--repeats", type=int, default=3)
    opts = args.parse_args()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    server = S3Server()
    server.proc.kill()  # restart it with its access log kept, to count requests
    server.proc.wait()
    server.proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(server.port)],
                                   stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server._wait_ready()
    os.environ.update(server.environ())
    try:
        run(server, opts, log.name)
    finally:
        server.stop()


def run(server, opts, log_path: str) -> None:
    from throttler.planning import footers

    s3 = server.client()
    s3.create_bucket(Bucket="bench")
    local = tempfile.mkdtemp(prefix="s3bench-")
    source = write_sim(os.path.join(local, "f.parquet"), 50_000, 12, seed=0)
    paths = []
    for i in range(opts.files):
        dst = os.path.join(local, f"f{i:05d}.parquet")
        os.link(source, dst)
        paths.append(dst)
    s3.upload_file(source, "bench", "g/f00000.parquet")
    for i in range(1, opts.files):
        s3.copy_object(Bucket="bench", Key=f"g/f{i:05d}.parquet", CopySource={"Bucket": "bench", "Key": "g/f00000.parquet"})
    urls = [f"s3://bench/g/f{i:05d}.parquet" for i in range(opts.files)]
    print(f"{opts.files} files of {os.path.getsize(source):,} bytes; median of {opts.repeats}")
    print(f"{'storage':8} {'method':22} {'seconds':>8} {'requests/file':>14}")
    for storage, group in (("local", paths), ("s3", urls)):
        for method, fn in (("file_infos (concurrent)", footers.file_infos),
                           ("file_info one by one", lambda ps: [footers.file_info(p) for p in ps])):
            times, requests = [], 0
            for _ in range(opts.repeats):
                before = _requests(log_path)
                started = time.perf_counter()
                fn(group)
                times.append(time.perf_counter() - started)
                requests = _requests(log_path) - before
            per_file = requests / len(group) if storage == "s3" else float("nan")
            print(f"{storage:8} {method:22} {statistics.median(times):8.2f} {per_file:14.1f}")


def _requests(log_path: str) -> int:
    with open(log_path, errors="replace") as fh:
        return sum(1 for line in fh if "GET /" in line or "HEAD /" in line)


if __name__ == "__main__":
    main()

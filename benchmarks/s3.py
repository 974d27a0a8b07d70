"""Object storage on a loopback S3 server (moto_server) beside local disk.

    python benchmarks/s3.py --part aggregate [--runs 3] [--layouts g00000,shuffled] [--bytes-layouts g00000]
    python benchmarks/s3.py --part plan [--files 2000]    # throttler plan of a many-file group
    python benchmarks/s3.py --part footers [--files 2000] # footers.file_infos, concurrent vs one by one
    python benchmarks/s3.py --part reads --latency-ms 20 [--runs 3] [--layouts g00000]  # value reads overlapped

``aggregate``: the 10-file groups of benchmarks/aggregate.py (``bench-data/aggregate/10x50000x120``:
``g00000`` aligned, ``shuffled`` not aligned), uploaded to the server; each is summed by
``throttler run`` (embedded cluster, 2 workers), every run in its own process, from
local disk and from s3:// in turn; the table gives the median seconds the run reports.
One more run of each group from s3:// goes through the fault proxy
(tests/helpers/s3_proxy.py), which counts the GET requests and body bytes: the
bytes read per file against the file's ``value`` column chunks (what any method
must read) show what the key checks cost on a store.

``reads``: the aligned group from s3:// through the fault proxy, which waits
``--latency-ms`` before forwarding each request (a cloud store's first-byte latency;
loopback has none), with the aligned leaf's object store reads one at a time
(``THROTTLER_OBJECT_STORE_READS_IN_FLIGHT=1``) and at the default; the proxy counts the
requests a file and the most GETs it had in flight at once.

``plan`` and ``footers``: a group of ``--files`` objects with the footer shape of a
real 6M-row file (6 row groups; the same columns, encodings and statistics) but few
rows: server-side copies of one small object, because moto keeps every object in
memory (2,000 x 50 MB would not fit). The server's RSS is printed. ``plan`` runs
``throttler plan`` (its own process) and reports the footer time it prints and the
requests the server logged.

What a loopback server cannot tell: round-trip latency (tens of ms to a cloud store,
well under 1 ms here), link bandwidth (the loopback moves GB/s; a pod's link is
often 1-10 Gbit/s, shared), throttling and per-prefix request limits, per-request
cost, and the store's own variance. What carries over: requests per file, bytes per
file, and ratios within one storage (concurrent vs serial footers). Seconds on S3
here are moto's (Python) serving speed, a lower bound on nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers.datafiles import write_sim  # noqa: E402
from tests.helpers.s3_proxy import S3Proxy, most_in_flight  # noqa: E402
from tests.helpers.s3_server import count_requests, logged_server  # noqa: E402

AGGREGATE = Path(__file__).resolve().parent.parent / "bench-data" / "aggregate" / "10x50000x120"
LAYOUTS = {"g00000": "aligned", "shuffled": "not aligned"}
VALUE_GET_MIN_BYTES = 1 << 20  #: GETs this large are value chunks (a seed file's are 6-8.7 MB; keys 0.13 MB)
RUN_LINE = re.compile(r"^ok +(\S+): ([\d,]+) rows from (\d+) files in ([\d.]+) s \(([^,]+)")


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--part", choices=("aggregate", "plan", "footers", "reads"), default="aggregate")
    args.add_argument("--latency-ms", type=float, default=20.0, help="reads: the proxy's wait before each request")
    args.add_argument("--files", type=int, default=2000)
    args.add_argument("--runs", type=int, default=3)
    args.add_argument("--layouts", default="g00000,shuffled", help="aggregate: the groups timed")
    args.add_argument("--bytes-layouts", default="g00000", help="aggregate: the groups whose bytes are counted")
    opts = args.parse_args()
    with logged_server() as (server, log_path):  # its access log counts the requests
        {"aggregate": aggregate, "plan": plan, "footers": footers, "reads": reads}[opts.part](server, opts, log_path)


# --------------------------------------------------------------------------- aggregate


def aggregate(server, opts, log_path: str) -> None:
    s3 = server.client()
    s3.create_bucket(Bucket="bench")
    for layout in set(opts.layouts.split(",")) | set(filter(None, opts.bytes_layouts.split(","))):
        for path in sorted((AGGREGATE / layout).glob("*.parquet")):
            s3.upload_file(str(path), "bench", f"agg/{layout}/{path.name}")
    print(f"moto_server RSS after uploading both groups: {_rss_gib(server):.2f} GiB; median of {opts.runs} runs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| group | strategy | local disk s | s3 (loopback) s | s3 / local | s3 requests / file |")
    print("|---|---|---:|---:|---:|---:|")
    out = tempfile.mkdtemp(prefix="s3bench-out-")
    for layout in opts.layouts.split(","):
        times = {"local": [], "s3": []}
        strategy, requests = "", 0
        n_files = len(list((AGGREGATE / layout).glob("*.parquet")))
        for _ in range(opts.runs):
            for where, root in (("local", str(AGGREGATE)), ("s3", "s3://bench/agg")):
                before = _requests(log_path)
                seconds, strategy = _run_group(layout, root, os.path.join(out, where), os.environ)
                requests = _requests(log_path) - before
                times[where].append(seconds)
                print(f"  {layout} {where}: {seconds:.2f} s", file=sys.stderr, flush=True)
        local, remote = statistics.median(times["local"]), statistics.median(times["s3"])
        print(f"| {layout} ({LAYOUTS[layout]}) | {strategy} | {local:.2f} | {remote:.2f} | {remote / local:.2f} "
              f"| {requests / n_files:.0f} |", flush=True)
    print()
    if opts.bytes_layouts:
        _bytes_table(server, out, opts.bytes_layouts.split(","))


def _run_group(group: str, root: str, out: str, env) -> tuple[float, str]:
    done = subprocess.run([sys.executable, "-m", "throttler", "run", group, "--data-root", root, "--output",
                           out if not root.startswith("s3://") else "s3://bench/out", "--workers", "2", "--quiet",
                           "--full"],  # a rerun with nothing new would otherwise be unchanged: nothing read
                          capture_output=True, text=True, env=env, timeout=900)
    match = RUN_LINE.match(done.stdout)
    if done.returncode != 0 or not match:
        raise SystemExit(f"throttler run {group} from {root} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(match.group(4)), match.group(5)


def _bytes_table(server, out: str, layouts: list[str]) -> None:
    proxy = S3Proxy(server.endpoint)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
    print("| group | strategy | GET requests / file | bytes read / file | value column / file | read / value | "
          "read / file size |")
    print("|---|---|---:|---:|---:|---:|---:|")
    try:
        for layout in layouts:
            label = LAYOUTS[layout]
            files = sorted((AGGREGATE / layout).glob("*.parquet"))
            value = sum(_value_bytes(f) for f in files) / len(files)
            size = sum(f.stat().st_size for f in files) / len(files)
            proxy.reset()
            _, strategy = _run_group(layout, "s3://bench/agg", out, env)
            gets, read = proxy.requests["GET"], proxy.get_body_bytes
            print(f"| {layout} ({label}) | {strategy} | {gets / len(files):.1f} | {read / len(files) / 1e6:.2f} MB "
                  f"| {value / 1e6:.2f} MB | {read / len(files) / value:.4f} | {read / len(files) / size:.4f} |")
    finally:
        proxy.stop()


def _value_bytes(path: Path) -> int:
    md = pq.read_metadata(path)
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    return sum(md.row_group(i).column(names.index("value")).total_compressed_size for i in range(md.num_row_groups))


# --------------------------------------------------------------------------- overlapped reads


def reads(server, opts, log_path: str) -> None:
    from throttler.config import DEFAULTS

    s3 = server.client()
    s3.create_bucket(Bucket="bench")
    layout = opts.layouts.split(",")[0]
    files = sorted((AGGREGATE / layout).glob("*.parquet"))
    for path in files:
        s3.upload_file(str(path), "bench", f"agg/{layout}/{path.name}")
    proxy = S3Proxy(server.endpoint)
    proxy.set_latency(opts.latency_ms / 1000)
    out = tempfile.mkdtemp(prefix="s3bench-out-")
    print(f"{layout} ({LAYOUTS[layout]}), {len(files)} files; proxy latency {opts.latency_ms:g} ms a request; "
          f"median of {opts.runs}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| storage | reads in flight a leaf | run s | GET / file | HEAD / file | most value GETs in flight | "
          "MB read / file |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("local disk", str(AGGREGATE), None), ("s3 via proxy", "s3://bench/agg", 1),
            ("s3 via proxy", "s3://bench/agg", DEFAULTS.object_store_reads_in_flight)]
    try:
        for where, root, in_flight in rows:
            env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
            if in_flight is not None:
                env["THROTTLER_OBJECT_STORE_READS_IN_FLIGHT"] = str(in_flight)
            seconds = []
            for _ in range(opts.runs):
                proxy.reset()
                seconds.append(_run_group(layout, root, os.path.join(out, where.split()[0]), env)[0])
                print(f"  {where} {in_flight}: {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
            n = len(files)
            counts = (f"{proxy.requests['GET'] / n:.1f} | {proxy.requests['HEAD'] / n:.1f} | "
                      f"{most_in_flight(proxy.gets, VALUE_GET_MIN_BYTES)} | {proxy.get_body_bytes / n / 1e6:.2f}") if in_flight else "- | - | - | -"
            print(f"| {where} | {in_flight or '-'} | {statistics.median(seconds):.2f} | {counts} |", flush=True)
        print()
        _leaf_reads(proxy, files, layout, opts.runs)
    finally:
        proxy.stop()


def _leaf_reads(proxy, files: list[Path], layout: str, runs: int) -> None:
    """One aligned leaf over the group's first 5 files, in this process (no cluster, no planner)."""
    from throttler.config import DEFAULTS
    from throttler.worker import kernels

    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # before this process makes its file system of the bucket
    local = [str(f) for f in files[:5]]
    urls = [f"s3://bench/agg/{layout}/{f.name}" for f in files[:5]]
    print(f"one aligned leaf of {len(urls)} files in this process; median of {runs}")
    print("| storage | reads in flight | leaf s | GET / file | most value GETs in flight |")
    print("|---|---:|---:|---:|---:|")
    for where, paths, in_flight in (("local disk", local, None), ("s3 via proxy", urls, 1),
                                    ("s3 via proxy", urls, DEFAULTS.object_store_reads_in_flight)):
        os.environ["THROTTLER_OBJECT_STORE_READS_IN_FLIGHT"] = str(in_flight or 1)
        seconds = []
        for _ in range(runs):
            proxy.reset()
            started = time.perf_counter()
            kernels.aligned_leaf(paths, paths[0])
            seconds.append(time.perf_counter() - started)
        counts = (f"{proxy.requests['GET'] / len(paths):.1f} | {most_in_flight(proxy.gets, VALUE_GET_MIN_BYTES)}"
                  if in_flight else "- | -")
        print(f"| {where} | {in_flight or '-'} | {statistics.median(seconds):.2f} | {counts} |", flush=True)
    os.environ.pop("THROTTLER_OBJECT_STORE_READS_IN_FLIGHT")


# --------------------------------------------------------------------------- many-file groups


def _many_file_group(server, n_files: int, prefix: str) -> tuple[list[str], str]:
    """``n_files`` local hard links and server-side copies of one file shaped like a real one."""
    s3 = server.client()
    s3.create_bucket(Bucket="bench")
    local = tempfile.mkdtemp(prefix="s3bench-")
    os.mkdir(os.path.join(local, "g"))
    # 6 row groups of 1,000 rows: a real 6M-row file's footer (6 row groups of <= 1,048,576 rows)
    source = write_sim(os.path.join(local, "f.parquet"), 600, 10, seed=0, row_group_size=1000)
    paths = []
    for i in range(n_files):
        dst = os.path.join(local, "g", f"f{i:05d}.parquet")
        os.link(source, dst)
        paths.append(dst)
    s3.upload_file(source, "bench", f"{prefix}/g/f00000.parquet")
    for i in range(1, n_files):
        s3.copy_object(Bucket="bench", Key=f"{prefix}/g/f{i:05d}.parquet",
                       CopySource={"Bucket": "bench", "Key": f"{prefix}/g/f00000.parquet"})
    md = pq.read_metadata(source)
    print(f"{n_files} files of {os.path.getsize(source):,} bytes ({md.num_row_groups} row groups, footer "
          f"{md.serialized_size:,} bytes); moto_server RSS {_rss_gib(server):.2f} GiB; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return paths, local


def plan(server, opts, log_path: str) -> None:
    _paths, local = _many_file_group(server, opts.files, "plan")
    print(f"median of {opts.runs}")
    print("| storage | footers read in s (as `throttler plan` prints) | plan command s | requests / file |")
    print("|---|---:|---:|---:|")
    for where, root in (("local", local), ("s3", "s3://bench/plan")):
        footer_s, wall_s, per_file = [], [], 0.0
        for _ in range(opts.runs):
            before = _requests(log_path)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "throttler", "plan", "g", "--data-root", root,
                                   "--workers", "1"], capture_output=True, text=True, timeout=900)
            wall_s.append(time.perf_counter() - started)
            match = re.search(r"footers read in ([\d.]+) s", done.stdout)
            if done.returncode != 0 or not match:
                raise SystemExit(f"throttler plan failed:\n{done.stdout}\n{done.stderr[-3000:]}")
            footer_s.append(float(match.group(1)))
            per_file = (_requests(log_path) - before) / opts.files
        shown = f"{per_file:.2f}" if where == "s3" else "-"
        print(f"| {where} | {statistics.median(footer_s):.2f} | {statistics.median(wall_s):.2f} | {shown} |")


def footers(server, opts, log_path: str) -> None:
    from throttler.planning import footers as footer_reads

    paths, _ = _many_file_group(server, opts.files, "footers")
    urls = [f"s3://bench/footers/g/f{i:05d}.parquet" for i in range(opts.files)]
    print(f"median of {opts.runs}")
    print("| storage | method | seconds | requests / file |")
    print("|---|---|---:|---:|")
    for where, group in (("local", paths), ("s3", urls)):
        for method, fn in (("file_infos (concurrent)", footer_reads.file_infos),
                           ("file_info one by one", lambda ps: [footer_reads.file_info(p) for p in ps])):
            times, requests = [], 0
            for _ in range(opts.runs):
                before = _requests(log_path)
                started = time.perf_counter()
                fn(group)
                times.append(time.perf_counter() - started)
                requests = _requests(log_path) - before
            shown = f"{requests / len(group):.2f}" if where == "s3" else "-"
            print(f"| {where} | {method} | {statistics.median(times):.2f} | {shown} |")


def _requests(log_path: str) -> int:
    """GET and HEAD requests so far: the reads."""
    counts = count_requests(log_path)
    return counts["GET"] + counts["HEAD"]


def _rss_gib(server) -> float:
    proc = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**30


if __name__ == "__main__":
    main()

"""Sum ``value`` by (path, Date) over one group of simulation files, every way we know.

    python benchmarks/aggregate.py                                    # 10 files x 6M rows, 3 runs
    python benchmarks/aggregate.py --paths 2000 --dates 12 --runs 1   # quick smoke run
    python benchmarks/aggregate.py --methods floor,aligned-kernels,duckdb --json results.json
    python benchmarks/aggregate.py --layout shuffled --methods floor3,dense-cluster,sum,duckdb,dense-cluster@mixed,aligned-cluster@aligned

``--layout`` picks the group: ``aligned`` (the generator's files, keys identical),
``shuffled`` (the same files with rows shuffled, some paths missing, one file
reaching past the others' path range, int32 paths in some, a little NaN) or
``mixed`` (8 aligned files and 2 shuffled ones); ``shuffled-nocrc`` is the
shuffled files written by pyarrow's default writer, without the page checksums
the generator stores (throttler verifies them where a file has them; DuckDB and
``floor3`` do not). A method named ``NAME@LAYOUT``
runs on that layout's files whatever ``--layout`` says, so peers on different
groups share one table.

The parent generates the group once (``--data``, cached), reads every file once so
the page cache is warm, then runs each method in a fresh child process
(``--method NAME``): one warm-up round, then ``--runs`` rounds, the methods in turn
within a round and never two at once. A child prints one JSON line: the compute
seconds timed inside the process (after imports and cluster start), its peak RSS
(plus its Dask workers' peaks) and the result's row count and checksum (the sum
of its values), which the parent compares across methods. The parent prints one
markdown table of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np  # every method needs these two; others are imported by the methods using them
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute in write_not_aligned)
import pyarrow.parquet as pq

FILES_PER_TASK = 5  #: files one throttler leaf task reads
FAN_IN = 8  #: partials one throttler combine task adds
N_WORKERS = 2
WORKER_MEMORY_BYTES = 4_000_000_000  #: memory_limit and the MEMORY resource of a worker
TASK_MEMORY_BYTES = 1_000_000_000  #: MEMORY each throttler task asks for (every task fits)
CHILD_TIMEOUT_SECONDS = 900
WAIT_IDLE_TIMEOUT_SECONDS = 60.0  #: --wait-idle gives up after this and runs anyway
CHECKSUM_ABS_TOL = 1e-6
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "bench-data" / "aggregate"  #: git-ignored

# --------------------------------------------------------------------------- data


def group_dir(args) -> Path:
    return Path(args.data) / f"{args.files}x{args.paths}x{args.dates}"


def group_files(args, layout: str = "aligned") -> list[str]:
    directory = group_dir(args) / ("g00000" if layout == "aligned" else layout)
    return [str(p.resolve()) for p in sorted(directory.glob("sim-*.parquet"))]


def layout_of(method: str, args) -> str:
    return method.split("@", 1)[1] if "@" in method else args.layout


def ensure_layout(args, layout: str) -> list[str]:
    """The files of ``layout``; the shuffled ones are made from the aligned ones once."""
    aligned = ensure_data(args)
    if layout == "aligned":
        return aligned
    shuffled_dir = group_dir(args) / "shuffled"
    if len(group_files(args, "shuffled")) != len(aligned):
        shuffled_dir.mkdir(exist_ok=True)
        for i, path in enumerate(aligned):
            write_not_aligned(path, shuffled_dir / Path(path).name, i, len(aligned))
    if layout == "shuffled-nocrc":
        plain_dir = group_dir(args) / layout
        if len(group_files(args, layout)) != len(aligned):
            plain_dir.mkdir(exist_ok=True)
            for source in group_files(args, "shuffled"):
                # pyarrow's (and pandas') default writer: no page checksums, so nothing to verify
                pq.write_table(pq.read_table(source), plain_dir / Path(source).name)
    if layout == "mixed":
        mixed_dir = group_dir(args) / "mixed"
        mixed_dir.mkdir(exist_ok=True)
        sources = aligned[:-2] + group_files(args, "shuffled")[-2:]
        for source in sources:
            link = mixed_dir / Path(source).name
            if link.is_symlink() and not link.exists():  # a link made from another checkout, gone since
                link.unlink()
            if not link.exists():
                link.symlink_to(os.path.relpath(source, mixed_dir.resolve()))  # relative: valid from any checkout
    return group_files(args, layout)


def write_not_aligned(source: str, target: Path, i: int, n_files: int) -> None:
    """File ``i`` of the shuffled layout: rows shuffled; every third file misses 5% of the
    paths; the last reaches 5% past the others' path range; odd files store int32 paths;
    every other file has a NaN in about 1 of 100,000 values."""
    rng = np.random.default_rng(1000 + i)
    table = pq.read_table(source)
    paths = table.column("path").to_numpy()
    keep = np.ones(len(paths), bool) if i % 3 else (paths % 20 != 7)
    table = table.filter(pa.array(keep))
    if i == n_files - 1:
        top = int(paths.max()) + 1
        extra = table.slice(0, max(1, table.num_rows // 20))
        extra = extra.set_column(0, "path", pa.compute.add(extra.column("path"), top))
        table = pa.concat_tables([table, extra])
    table = table.take(pa.array(rng.permutation(table.num_rows)))
    if i % 2:
        table = table.set_column(0, "path", table.column("path").cast(pa.int32()))
    if i % 2 == 0:
        values = table.column("value").to_numpy().copy()
        values[rng.random(len(values)) < 1e-5] = np.nan
        table = table.set_column(2, "value", pa.array(values))
    pq.write_table(table, target, write_page_checksum=True)


def ensure_data(args) -> list[str]:
    """The group's files under ``--data``, generated by throttler's tool when missing."""
    from throttler.commands.generate import EstateSpec, write_estate

    root = group_dir(args)
    if not (root / "manifest.csv").exists():  # written last: its presence means complete
        print(f"generating {args.files} files of {args.paths} x {args.dates} rows under {root}",
              file=sys.stderr)
        spec = EstateSpec(groups=1, min_files=args.files, max_files=args.files,
                          paths=args.paths, dates=args.dates)
        write_estate(root, spec)
    return group_files(args)


def warm_page_cache(files: list[str]) -> int:
    """Read every file once, so that timed runs find it in the page cache; returns bytes."""
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total


# --------------------------------------------------------------------------- measuring helpers


def cpu_busy_fraction(interval_seconds: float = 1.0) -> float:
    """How busy the machine's CPUs were over ``interval_seconds`` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(interval_seconds)
    idle1, total1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(max_busy: float, timeout_seconds: float = WAIT_IDLE_TIMEOUT_SECONDS) -> float:
    """Wait until other work leaves the CPUs at most ``max_busy`` busy; returns the last reading."""
    deadline = time.monotonic() + timeout_seconds
    busy = cpu_busy_fraction()
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


#: --warm-process: each child calls its method once, untimed, before the timed call
WARM_PROCESS = False


def warm_up(fn, *args, **kwargs) -> None:
    """With --warm-process, one untimed call of ``fn``, its results released before returning.

    A long-running daemon's workers are warm: pyarrow's memory pool and thread
    pools exist and big allocations have been made before. The first call in a
    fresh process (and, for the cluster methods, fresh workers) pays for all of
    that; this call takes it out of the timer, for every method alike.
    """
    if not WARM_PROCESS:
        return
    import gc

    fn(*args, **kwargs)
    gc.collect()
    try:
        from distributed import default_client
        client = default_client()
    except (ImportError, ValueError):
        return
    deadline = time.monotonic() + 30
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the warm-up's keys are released: the timed call cannot reuse its results


def timed(fn, *args, **kwargs):
    """({"seconds", "cpu_seconds"}, result) of one call; CPU counts all of this process's threads."""
    warm_up(fn, *args, **kwargs)
    return clocked(fn, *args, **kwargs)


def clocked(fn, *args, **kwargs):
    """:func:`timed` without the warm-up."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}, result


def peak_rss_bytes(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # kilobytes on Linux


def result_of(timing: dict, values, rows: int, **extra) -> dict:
    """A method's report: timing, result rows and the checksum (sum of values, NaN skipped)."""
    return {**timing, "rows": int(rows), "checksum": float(np.nansum(values)), **extra}


def output_result(timing: dict, output_path: str, **extra) -> dict:
    table = pq.read_table(output_path, columns=["value"])
    return result_of(timing, table.column(0).to_numpy(), table.num_rows, **extra)


@contextlib.contextmanager
def local_cluster():
    """The shape the seed ran on: 2 worker processes of 1 thread and 4 GB each."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                      memory_limit=WORKER_MEMORY_BYTES, resources={"MEMORY": WORKER_MEMORY_BYTES},
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
        with Client(cluster) as client:
            yield client


def strategy_modules(strategy: str) -> tuple[str, ...]:
    """The modules a worker has imported once it ran ``strategy``'s tasks, beyond what the daemon's
    package probe imports at its join (:func:`warm_like_the_daemon`): ``dense`` tasks load numba
    and its compiled loops. ``THROTTLER_BENCH_WORKER_MODULES`` (comma-separated) adds modules."""
    extra = tuple(m for m in os.environ.get("THROTTLER_BENCH_WORKER_MODULES", "").split(",") if m)
    if strategy == "dense":
        return ("throttler.worker.dense", "throttler.worker.scatter", "throttler.worker.dense_merge",
                "throttler.worker.page_checks") + extra
    return extra


def warm_like_the_daemon(client, strategy: str) -> None:
    """Workers as a daemon's are when ``strategy``'s group runs: the package probe run on them (it
    imports kernels, and numba's page checks on workers of 2.19 GiB or more, as these 4 GB ones;
    ``THROTTLER_BENCH_NO_PROBE=1`` leaves the probe out), then :func:`strategy_modules`."""
    from throttler.cluster.workers import worker_package_reports

    if os.environ.get("THROTTLER_BENCH_NO_PROBE") != "1":
        worker_package_reports(client, list(client.scheduler_info()["workers"]))
    warm_workers(client, "throttler.worker.kernels", *strategy_modules(strategy))


def warm_workers(client, *modules: str) -> None:
    """Import ``modules`` on every worker, so that the timer sees no imports there either."""
    import importlib

    for module in modules:
        client.run(importlib.import_module, module)


def timed_on_cluster(client, fn, *args):
    """:func:`timed`, with the workers' CPU seconds added to the client process's."""
    warm_up(fn, *args)
    before = sum(client.run(time.process_time).values())
    timing, result = clocked(fn, *args)
    timing["cpu_seconds"] += sum(client.run(time.process_time).values()) - before
    return timing, result


def workers_peak_rss_bytes(client) -> int:
    """Sum of the live workers' own peak RSS (killed workers show in RUSAGE_CHILDREN)."""
    return sum(client.run(peak_rss_bytes).values())


# --------------------------------------------------------------------------- throttler


def throttler_plan(files: list[str], strategy: str):
    from throttler.planning.footers import file_info
    from throttler.planning.plan import Plan

    infos = tuple(file_info(path) for path in files)  # the footers, as the planner reads them
    return Plan("bench", strategy, infos, files_per_task=FILES_PER_TASK, fan_in=FAN_IN,
                task_peak_bytes=TASK_MEMORY_BYTES, group_peak_bytes=N_WORKERS * TASK_MEMORY_BYTES,
                expansion=1.0, requested_strategy=strategy)


def run_throttler_cluster(files: list[str], work: str, strategy: str = "aligned") -> dict:
    from throttler.service import records
    from throttler.worker import graphs

    out = os.path.join(work, f"{strategy}-cluster.parquet")
    with local_cluster() as client:
        warm_like_the_daemon(client, strategy)
        graph = graphs.build(throttler_plan(files, strategy), out)
        timing, summary = timed_on_cluster(client, lambda: client.compute(
            graph.final, resources={"MEMORY": TASK_MEMORY_BYTES}).result())
        workers = workers_peak_rss_bytes(client)
    return output_result(timing, out, rss_workers_bytes=workers,
                         task_worker_peak_bytes=summary.get("worker_peak_rss_bytes"),
                         task_worker_rise_bytes=records.worker_peak_rise_bytes(summary),
                         task_estimate_bytes=task_estimate_bytes(files, strategy))


def task_estimate_bytes(files: list[str], strategy: str) -> int:
    """The estimator's largest task of the benchmark's tree (uncorrected model)."""
    from throttler.planning.footers import file_info
    from throttler.planning.memory_model import largest_file, raw_task_peaks

    n_leaves = -(-len(files) // FILES_PER_TASK)
    infos = [file_info(path) for path in files]
    return raw_task_peaks(strategy, largest_file(infos), FILES_PER_TASK, FAN_IN, n_leaves).peak_bytes


def aligned_result_summary(partials, reference_path: str) -> dict:
    """The aligned final task without its write: keys attached and checked, output table built."""
    from throttler.worker import kernels

    total, table, _peak = kernels.aligned_result(partials, reference_path)
    values = table.column("value").to_numpy()
    checksum = np.nansum(values) if total.nan_count else values.sum()  # nansum copies: only when needed
    return {"rows": table.num_rows, "checksum": float(checksum)}


def no_write_graph(files: list[str]):
    """The aligned graph (leaves of FILES_PER_TASK files, one final) with a final that does not write."""
    import dask

    from throttler.worker import kernels

    chunks = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
    leaves = [dask.delayed(kernels.aligned_leaf, pure=False)(chunk, files[0]) for chunk in chunks]
    return dask.delayed(aligned_result_summary, pure=False)(leaves, files[0])


def run_throttler_cluster_no_write(files: list[str], work: str) -> dict:
    """The aligned graph through the LocalCluster, its final task stopping short of the write:
    the same work as the floor's plus key verification and attachment (like for like)."""
    with local_cluster() as client:
        warm_like_the_daemon(client, "aligned")
        final = no_write_graph(files)
        timing, summary = timed_on_cluster(client, lambda: client.compute(
            final, resources={"MEMORY": TASK_MEMORY_BYTES}).result())
        workers = workers_peak_rss_bytes(client)
    return {**timing, **summary, "rss_workers_bytes": workers}


def run_throttler_sync(files: list[str], work: str, strategy: str) -> dict:
    """The whole graph (leaves, combines, final write) on dask's synchronous scheduler."""
    import dask

    from throttler.worker import graphs

    dask.delayed(int)(0).compute(scheduler="sync")  # the first compute imports distributed: untimed
    out = os.path.join(work, f"{strategy}-sync.parquet")
    graph = graphs.build(throttler_plan(files, strategy), out)
    timing, _ = timed(graph.final.compute, scheduler="sync")
    return output_result(timing, out)


def run_aligned_kernels(files: list[str], work: str) -> dict:
    """The aligned kernels called directly, everything but the output write."""
    from throttler.worker import kernels

    def compute():
        chunks = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
        partials = [kernels.aligned_leaf(chunk, files[0]) for chunk in chunks]
        return kernels.aligned_result(partials, files[0])

    timing, (_total, table, _peak) = timed(compute)
    return result_of(timing, table.column("value").to_numpy(), table.num_rows)


def run_aligned_leaves(files: list[str], work: str) -> dict:
    """Only the leaves and their sum: what key verification costs next to the floor."""
    from throttler.worker import kernels

    def compute():
        chunks = [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]
        return kernels.aligned_combine([kernels.aligned_leaf(chunk, files[0]) for chunk in chunks])

    timing, total = timed(compute)
    return result_of(timing, total.data, len(total.data))


# --------------------------------------------------------------------------- dask dataframe


def run_dask_dataframe(files: list[str], work: str, split_out: bool | None = None) -> dict:
    """The seed's way; a KilledWorker is reported as a failed run, as the seed saw it."""
    import dask.dataframe as dd
    from distributed import KilledWorker

    def compute(series):
        try:
            return series.compute()
        except KilledWorker as exc:
            return exc

    with local_cluster() as client:
        warm_workers(client, "dask.dataframe", "pyarrow.parquet")
        frame = dd.read_parquet(files, columns=["path", "Date", "value"])
        series = frame.groupby(["path", "Date"]).value.sum(split_out=split_out)
        timing, result = timed_on_cluster(client, compute, series)
        workers = workers_peak_rss_bytes(client)
    if isinstance(result, KilledWorker):
        task = getattr(result, "task", "?")
        return {**timing, "status": f"failed: KilledWorker ({task})", "rss_workers_bytes": workers}
    return result_of(timing, result.to_numpy(), len(result), rss_workers_bytes=workers)


# --------------------------------------------------------------------------- pandas, duckdb, polars


def read_frame(path: str):
    """One file as a pandas DataFrame with datetime64 dates (not Python date objects)."""
    return pq.read_table(path, columns=["path", "Date", "value"]).to_pandas(date_as_object=False)


def run_pandas_groupby(files: list[str], work: str) -> dict:
    import pandas as pd

    def compute():
        frame = pd.concat([read_frame(path) for path in files], ignore_index=True)
        return frame.groupby(["path", "Date"]).value.sum()

    timing, result = timed(compute)
    return result_of(timing, result.to_numpy(), len(result))


def run_pandas_index(files: list[str], work: str) -> dict:
    def compute():
        total = None
        for path in files:
            series = read_frame(path).set_index(["path", "Date"])["value"]
            total = series if total is None else total.add(series, fill_value=0.0)
        return total

    timing, result = timed(compute)
    return result_of(timing, result.to_numpy(), len(result))


def run_duckdb(files: list[str], work: str) -> dict:
    import duckdb

    con = duckdb.connect()
    query = 'SELECT path, "Date", sum(value) AS value FROM read_parquet($files) GROUP BY path, "Date"'
    timing, table = timed(lambda: con.sql(query, params={"files": files}).to_arrow_table())
    return result_of(timing, table.column("value").to_numpy(), table.num_rows,
                     threads=con.sql("SELECT current_setting('threads')").fetchall()[0][0])


def run_polars(files: list[str], work: str) -> dict:
    import polars as pl

    query = pl.scan_parquet(files).group_by(["path", "Date"]).agg(pl.col("value").sum())
    timing, frame = timed(query.collect, engine="streaming")
    return result_of(timing, frame["value"].to_numpy(), frame.height)


# --------------------------------------------------------------------------- the floor


def add_value_columns(files: list[str], on_file=None):
    """pyarrow reads each file's ``value`` column a row group at a time; numpy adds it.

    The fastest plain way measured here: memory-mapped, a row group at a time
    (the chunk is still in cache for the add). Whole-column reads, ``pre_buffer``
    and ``use_threads=False`` measured the same or slower.
    """
    acc = None
    for path in files:
        pf = pq.ParquetFile(pa.memory_map(path, "r"))
        if on_file:
            on_file(pf)
        if acc is None:
            acc = np.zeros(pf.metadata.num_rows)
        offset = 0
        for rg in range(pf.metadata.num_row_groups):
            values = pf.read_row_group(rg, columns=["value"]).column(0).to_numpy()
            np.add(acc[offset:offset + len(values)], values, out=acc[offset:offset + len(values)])
            offset += len(values)
    return acc


def run_floor(files: list[str], work: str) -> dict:
    timing, acc = timed(add_value_columns, files)
    return result_of(timing, acc, len(acc))


def run_floor_keys(files: list[str], work: str) -> dict:
    """The floor plus the naive verification: decode every file's keys, compare to the first's."""
    from throttler.worker import contract

    reference = []

    def verify(pf):
        paths, dates = contract.read_keys(pf, "file")
        if not reference:
            reference.extend((paths, dates))
        elif not (np.array_equal(paths, reference[0]) and np.array_equal(dates, reference[1])):
            raise ValueError("keys differ")

    timing, acc = timed(add_value_columns, files, verify)
    return result_of(timing, acc, len(acc))


def run_floor3(files: list[str], work: str) -> dict:
    """Read the three contract columns of every file a row group at a time; the checksum only."""
    def read():
        total, rows = 0.0, 0
        for path in files:
            pf = pq.ParquetFile(pa.memory_map(path, "r"))
            for rg in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(rg, columns=["path", "Date", "value"])
                total += float(np.nansum(table.column(2).to_numpy()))
                rows += table.num_rows
        return total, rows

    timing, (total, rows) = timed(read)
    return {**timing, "rows": rows, "checksum": total, "rows_are_input_rows": True}


METHODS = {
    "aligned-cluster": (run_throttler_cluster, "throttler aligned, LocalCluster 2x1 thread, incl. output write"),
    "aligned-cluster-compute": (run_throttler_cluster_no_write, "throttler aligned, LocalCluster 2x1 thread, no output write"),
    "aligned-sync": (lambda f, w: run_throttler_sync(f, w, "aligned"), "throttler aligned, dask sync, incl. output write"),
    "aligned-kernels": (run_aligned_kernels, "throttler aligned kernels called directly, no output write"),
    "aligned-leaves": (run_aligned_leaves, "throttler aligned leaves + their sum only (keys verified, not attached)"),
    "sum": (lambda f, w: run_throttler_sync(f, w, "sum"), "throttler sum (index-aligned), dask sync, incl. write"),
    "groupby": (lambda f, w: run_throttler_sync(f, w, "groupby"), "throttler groupby, dask sync, incl. write"),
    "dask-df": (run_dask_dataframe, "dd.read_parquet().groupby().value.sum(), LocalCluster"),
    "dask-df-split-out": (lambda f, w: run_dask_dataframe(f, w, split_out=True), "same, split_out=True"),
    "pandas-groupby": (run_pandas_groupby, "pandas concat + groupby().sum()"),
    "pandas-index": (run_pandas_index, "pandas set_index + Series.add(fill_value=0)"),
    "duckdb": (run_duckdb, "DuckDB GROUP BY over read_parquet([...])"),
    "polars": (run_polars, "Polars scan_parquet + group_by().sum(), streaming engine"),
    "floor": (run_floor, "pyarrow reads value columns + numpy.add (no key checks)"),
    "floor-keys": (run_floor_keys, "floor + every file's keys decoded and compared"),
    "floor3": (run_floor3, "pyarrow reads path, Date, value a row group at a time (no sum): any layout's floor"),
    "dense-cluster": (lambda f, w: run_throttler_cluster(f, w, "dense"),
                      "throttler dense, LocalCluster 2x1 thread, incl. output write"),
    "sum-cluster": (lambda f, w: run_throttler_cluster(f, w, "sum"),
                    "throttler sum, LocalCluster 2x1 thread, incl. output write"),
}


# --------------------------------------------------------------------------- child process


def child_main(args) -> None:
    """Run one method and print its JSON report as the last line of stdout."""
    import pandas  # noqa: F401  (pyarrow's first to_numpy() imports it: keep that out of the timer)

    global WARM_PROCESS
    WARM_PROCESS = args.warm_process
    files = group_files(args, layout_of(args.method, args))  # the parent made sure they exist
    work = str(Path(args.data) / "out")
    os.makedirs(work, exist_ok=True)
    report = {"method": args.method, "status": "ok"}
    report.update(METHODS[args.method.split("@")[0]][0](files, work))
    report["rss_self_bytes"] = peak_rss_bytes()
    report["rss_children_max_bytes"] = peak_rss_bytes(resource.RUSAGE_CHILDREN)
    print(json.dumps(report), flush=True)


# --------------------------------------------------------------------------- parent process


def run_child(method: str, args) -> dict:
    """One run of ``method`` in a fresh interpreter; the whole-process wall time is added."""
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--data", args.data,
           "--files", str(args.files), "--paths", str(args.paths), "--dates", str(args.dates),
           "--layout", args.layout]
    cmd += ["--warm-process"] if args.warm_process else []
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return {"method": method, "status": f"failed: timeout after {CHILD_TIMEOUT_SECONDS} s"}
    wall = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"method": method, "status": f"failed: exit {proc.returncode}: {error}", "process_seconds": wall}
    return {**json.loads(lines[-1]), "process_seconds": wall}


def run_all(methods: list[str], args) -> dict[str, list[dict]]:
    """A warm-up round (discarded), then ``--runs`` rounds of every method, one at a time."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_no in range(args.runs + 1):
        label = "warm-up" if round_no == 0 else f"run {round_no}/{args.runs}"
        for method in methods:
            busy = wait_until_idle(args.wait_idle) if args.wait_idle < 1 else None
            report = {**run_child(method, args), "cpu_busy_before": busy}
            print(f"  {label:9s} {method:18s} {report.get('seconds', float('nan')):8.3f} s  "
                  f"{report['status']}" + (f"  (CPUs {busy:.0%} busy before)" if busy is not None else ""),
                  file=sys.stderr, flush=True)
            if round_no:
                runs[method].append(report)
    return runs


def total_rss_bytes(report: dict) -> int:
    """The process's peak plus its workers' (live peaks, or the largest dead one x workers)."""
    workers = report.get("rss_workers_bytes")
    if workers is None:
        return report["rss_self_bytes"]
    return report["rss_self_bytes"] + max(workers, report.get("rss_children_max_bytes", 0))


def summarise(method: str, reports: list[dict]) -> dict:
    """Medians over the successful runs of one method (or how it failed)."""
    ok = [r for r in reports if r["status"] == "ok"]
    row = {"method": method, "runs": len(reports), "ok": len(ok),
           "failures": [r["status"] for r in reports if r["status"] != "ok"]}
    if ok:
        seconds = [r["seconds"] for r in ok]
        row.update(seconds=statistics.median(seconds), seconds_min=min(seconds), seconds_max=max(seconds),
                   cpu_seconds=statistics.median(r["cpu_seconds"] for r in ok),
                   process_seconds=statistics.median(r["process_seconds"] for r in ok),
                   rss_bytes=statistics.median(total_rss_bytes(r) for r in ok),
                   rows=ok[0]["rows"], checksum=ok[0]["checksum"],
                   input_rows=bool(ok[0].get("rows_are_input_rows")))
        peaks = [r["task_worker_peak_bytes"] for r in ok if r.get("task_worker_peak_bytes")]
        if peaks:
            row.update(task_worker_peak_bytes=max(peaks), task_estimate_bytes=ok[0]["task_estimate_bytes"])
        rises = [r["task_worker_rise_bytes"] for r in ok if r.get("task_worker_rise_bytes")]
        if rises:
            row.update(task_worker_rise_bytes=max(rises))
    else:
        timed_runs = [r["seconds"] for r in reports if "seconds" in r]
        row["seconds_to_failure"] = statistics.median(timed_runs) if timed_runs else None
    return row


def render_table(rows: list[dict]) -> str:
    done = [r for r in rows if "seconds" in r]
    fastest = min((r["seconds"] for r in done), default=math.nan)
    reference = next((r for r in done if r["method"] in ("floor", "floor3")), None)
    floor = reference["seconds"] if reference else math.nan
    lines = ["| method | compute s (median) | min-max | x fastest | x floor | CPU s | process wall s | "
             "peak RSS MiB | rows | notes |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['method']} | failed | | | | | | | | {failure_note(r)} |")
            continue
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['seconds_min']:.3f}-{r['seconds_max']:.3f} | "
                     f"{r['seconds'] / fastest:.2f} | {r['seconds'] / floor:.2f} | {r['cpu_seconds']:.2f} | "
                     f"{r['process_seconds']:.2f} | {r['rss_bytes'] / 2**20:,.0f} | {r['rows']:,} | "
                     f"{'; '.join(notes(r, reference))} |")
    return "\n".join(lines)


def failure_note(r: dict) -> str:
    note = f"{r['failures'][0]} in {len(r['failures'])} of {r['runs']} runs"
    if r.get("seconds_to_failure") is not None:
        note += f", {r['seconds_to_failure']:.1f} s to failure (median)"
    return note


def notes(r: dict, reference: dict | None) -> list[str]:
    out = [METHODS[r["method"].split("@")[0]][1]]
    if "@" in r["method"]:
        out[0] += f" (on the {r['method'].split('@')[1]} layout)"
    if r.get("task_worker_peak_bytes"):
        rise = (f" ({r['task_worker_rise_bytes'] / 2**20:,.0f} MiB above its start)"
                if r.get("task_worker_rise_bytes") else "")
        out.append(f"largest task's worker peak RSS {r['task_worker_peak_bytes'] / 2**20:,.0f} MiB{rise}, "
                   f"estimate {r['task_estimate_bytes'] / 2**20:,.0f} MiB")
    if reference and (reference.get("input_rows") or "@" in r["method"]):
        return out  # rows and checksums compare only like with like
    if r["failures"]:
        out.append(f"{len(r['failures'])} of {r['runs']} runs failed ({r['failures'][0]})")
    if reference and (r["rows"] != reference["rows"] or not math.isclose(
            r["checksum"], reference["checksum"], rel_tol=0, abs_tol=CHECKSUM_ABS_TOL)):
        out.append(f"RESULT DIFFERS from floor: rows {r['rows']}, checksum {r['checksum']:.9g}")
    return out


def _repo_relative(path) -> str:
    """``path`` relative to the repository when inside it: printed tables name no machine's paths."""
    resolved, repo = Path(path).resolve(), Path(__file__).resolve().parent.parent
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else resolved.name


def installed_version(package: str) -> str:
    """The installed version of ``package``, or "not installed" (polars is optional: only its method needs it)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(args, files: list[str], warmed_bytes: int, load: tuple[float, float], runs) -> str:
    versions = ", ".join(f"{p} {installed_version(p)}" for p in
                         ("dask", "distributed", "pandas", "pyarrow", "numpy", "duckdb", "polars"))
    busy = [r["cpu_busy_before"] for rs in runs.values() for r in rs if r.get("cpu_busy_before") is not None]
    quiet = (f" Before each run the CPUs were {statistics.median(busy):.0%} busy (median; at most "
             f"{max(busy):.0%}) over one second." if busy else "")
    warm = (" which first made one untimed call of its method (warm process and workers)"
            if args.warm_process else "")
    return (f"{len(files)} files x {args.paths * args.dates:,} rows ({warmed_bytes / 1e6:,.1f} MB) under "
            f"{_repo_relative(args.data)}; median of {args.runs} runs after one warm-up run, each run a fresh "
            f"process{warm}, methods run one at a time.\nPage cache: warm (the parent read every file once before "
            f"the warm-up). Machine: {os.cpu_count()} CPUs, 1-min load average {load[0]:.2f} before and "
            f"{load[1]:.2f} after the runs.{quiet}\nPython {platform.python_version()}; {versions}.")


def parent_main(args) -> None:
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m.split("@")[0] not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for layout in sorted({layout_of(m, args) for m in methods}):
        files = ensure_layout(args, layout)
        warmed = warm_page_cache(files)
    files = group_files(args, args.layout)
    load_before = os.getloadavg()[0]
    runs = run_all(methods, args)
    load = (load_before, os.getloadavg()[0])
    rows = [summarise(m, runs[m]) for m in methods]
    print(environment(args, files, warmed, load, runs) + "\n")
    print(render_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "load_average": load, "summary": rows, "runs": runs}, fh, indent=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="cache directory of the generated files")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--paths", type=int, default=50_000)
    parser.add_argument("--dates", type=int, default=120)
    parser.add_argument("--layout", choices=("aligned", "shuffled", "mixed", "shuffled-nocrc"), default="aligned",
                        help="which group the methods read (see the module docstring)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method, after one warm-up")
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--json", help="also write the summary and every run's report here")
    parser.add_argument("--wait-idle", type=float, default=1.0, metavar="FRACTION",
                        help="before each run, wait (up to 1 min) until the CPUs are at most this busy "
                             "(e.g. 0.2 on a shared machine; default 1: never wait)")
    parser.add_argument("--warm-process", action="store_true",
                        help="in each child, one untimed call of the method before the timed one "
                             "(steady state of a long-running daemon's workers; default: first call, cold)")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child mode: run this one method
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    child_main(arguments) if arguments.method else parent_main(arguments)

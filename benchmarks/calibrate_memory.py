"""Calibrate the per-task peak model against worker RSS: estimate vs measured, per task kind.

Every (strategy, task kind) runs on a real worker process (a fresh one-worker
``LocalCluster`` per row) over seed-shaped files (default 50,000 paths x 120
irregular dates = 6,000,000 rows, float64 ``value``, written with
:func:`throttler.generate.write_estate`). Three configurations:

* ``1t``: 1 thread per worker, the task alone;
* ``2t-solo``: 2 threads per worker, the task alone;
* ``2t-pair``: 2 threads per worker, two such tasks at once (distinct inputs).

**measured** is the worker's peak RSS while the task(s) ran (``VmHWM``, reset
just before the submission through ``/proc/self/clear_refs``, read after)
minus the worker's *idle baseline*: its RSS after a warm-up task of the same
kernels on a tiny file (imports done, nothing held), read before any input
was made. Combine and final inputs (partials made by leaves on the same
worker) are therefore inside the figure, as the model counts them. The ``1t``
and ``2t-solo`` rows also show the task's own :class:`throttler.peakrss.Measured`
reading (absolute VmHWM) minus the same baseline. ``estimate`` is
:func:`throttler.estimator.raw_task_peaks` (uncorrected); a pair is compared
with twice the estimate. ``ratio`` = measured / estimate: at most 1 is safe.

    python benchmarks/calibrate_memory.py                   # ~10 min on 2 cores
    python benchmarks/calibrate_memory.py --paths 2000 --dates 12   # smoke run
    python benchmarks/calibrate_memory.py --strategies groupby --files A,B,A,B   # A, B: keys differ
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import dask
from distributed import Client, LocalCluster, wait

from throttler.commands.generate import EstateSpec, write_estate
from throttler.planning.footers import file_info
from throttler.planning.memory_model import raw_task_peaks
from throttler.worker import kernels
from throttler.worker.peakrss import (
    Measured,
    high_water_mark_bytes,
    reset_high_water_mark,
)

STRATEGIES = ("aligned", "sum", "groupby")
KINDS = ("leaf", "combine", "final")
CONFIGS = (("1t", 1, 1), ("2t-solo", 2, 1), ("2t-pair", 2, 2))  # (name, threads, tasks at once)
WORKER_LIMIT_BYTES = 12 * 2**30  # large: no pause, spill or kill may disturb a reading


def _rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _functions(strategy: str, reference: str):
    if strategy == "aligned":
        return ((kernels.aligned_leaf, (reference,)), (kernels.aligned_combine, ()),
                (kernels.aligned_final, (reference,)))
    if strategy == "sum":
        return (kernels.sum_leaf, ()), (kernels.sum_combine, ()), (kernels.sum_final, ())
    return (kernels.groupby_leaf, ()), (kernels.groupby_combine, ()), (kernels.groupby_final, ())


def _estimate_bytes(strategy: str, kind: str, largest, files_per_task: int, inputs: int) -> int:
    if kind == "leaf":
        return raw_task_peaks(strategy, largest, files_per_task, 2, 3).leaf_bytes
    if kind == "combine":
        return raw_task_peaks(strategy, largest, 1, inputs, inputs + 1).combine_bytes
    return raw_task_peaks(strategy, largest, 1, inputs, inputs).final_bytes


def _submit_tasks(client, strategy, kind, files, tiny, out_dir, copies, files_per_task, inputs, measured):
    """Make the inputs (held on the worker), then submit ``copies`` tasks of ``kind`` at once."""
    (leaf, leaf_x), (combine, _), (final, final_x) = _functions(strategy, files[0])
    wrap = Measured if measured else (lambda fn: fn)
    if kind == "leaf":
        reset_on_worker(client)
        return [client.submit(wrap(leaf), files[:files_per_task], *leaf_x, pure=False) for _ in range(copies)]
    parts = [[client.submit(leaf, [files[(c * inputs + i) % len(files)]], *leaf_x, pure=False)
              for i in range(inputs)] for c in range(copies)]
    wait([p for ps in parts for p in ps])
    reset_on_worker(client)
    if kind == "combine":
        return [client.submit(wrap(combine), ps, pure=False) for ps in parts]
    return [client.submit(wrap(final), ps, *final_x, os.path.join(out_dir, f"out-{c}.parquet"), pure=False)
            for c, ps in enumerate(parts)]


def reset_on_worker(client) -> None:
    client.run(reset_high_water_mark)


def _task_reading(result) -> int:
    if isinstance(result, dict):
        return int(result.get("worker_peak_rss_bytes") or 0)
    return int(result.worker_peak.rss_bytes)


def run_case(strategy, kind, threads, copies, files, tiny, files_per_task, inputs) -> dict:
    """One row: a fresh worker, warm-up, baseline, the task(s), the readings."""
    with dask.config.set({"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=True,
                               memory_limit=WORKER_LIMIT_BYTES, dashboard_address=":0")
        client = Client(cluster)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            for k in KINDS:  # warm-up: every kernel of the strategy once, on a tiny file
                client.gather(_submit_tasks(client, strategy, k, [tiny] * 4, tiny, out_dir, 1, 1, 2, False))
            baseline = max(client.run(_rss_bytes).values())
            futures = _submit_tasks(client, strategy, kind, files, tiny, out_dir, copies, files_per_task,
                                    inputs, measured=copies == 1)
            wait(futures)  # read the window before gather: sending results to the client costs copies
            window = max(client.run(high_water_mark_bytes).values())
            results = client.gather(futures)
            task = max(_task_reading(r) for r in results) if copies == 1 else 0
    finally:
        client.close()
        cluster.close()
    return {"baseline": baseline, "measured": window - baseline, "task": task - baseline if task else 0}


def _data(args) -> tuple[list[str], str]:
    root = Path(args.data) / f"{args.paths}x{args.dates}"
    spec = EstateSpec(groups=1, max_files=4, min_files=4, paths=args.paths, dates=args.dates, seed=16)
    if not (root / "manifest.csv").exists():
        write_estate(root, spec)
    tiny = Path(args.data) / "tiny"
    if not (tiny / "manifest.csv").exists():
        write_estate(tiny, EstateSpec(groups=1, max_files=2, min_files=2, paths=50, dates=4, seed=16))
    files = sorted(str(p) for p in (root / "g00000").glob("*.parquet"))
    return files, str(sorted((tiny / "g00000").glob("*.parquet"))[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="bench-data/calibrate")
    p.add_argument("--paths", type=int, default=50_000)
    p.add_argument("--dates", type=int, default=120)
    p.add_argument("--files-per-task", type=int, default=2, help="files per leaf")
    p.add_argument("--inputs", type=int, default=2, help="partials per combine and final task")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--files", help="comma-separated seed-shaped files to use instead of generated ones, e.g. "
                                   "two whose keys differ so that groupby merges regroup")
    args = p.parse_args(argv)
    files, tiny = _data(args)
    if args.files:
        files = args.files.split(",")
    largest = file_info(files[0])
    mib = 2**20
    print(f"{len(files)} files of {largest.rows:,} rows, {largest.size_bytes / mib:.1f} MiB each; "
          f"leaf = {args.files_per_task} files, combine/final = {args.inputs} partials\n")
    print("| strategy | kind | config | estimate MiB | measured MiB | task reading MiB | baseline MiB | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for strategy in args.strategies.split(","):
        for kind in args.kinds.split(","):
            est = _estimate_bytes(strategy, kind, largest, args.files_per_task, args.inputs)
            for name, threads, copies in CONFIGS:
                r = run_case(strategy, kind, threads, copies, files, tiny, args.files_per_task, args.inputs)
                task = f"{r['task'] / mib:.0f}" if r["task"] else "-"
                print(f"| {strategy} | {kind} | {name} | {est * copies / mib:.0f} | {r['measured'] / mib:.0f} | "
                      f"{task} | {r['baseline'] / mib:.0f} | {r['measured'] / (est * copies):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

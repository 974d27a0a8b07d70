"""Memory safety across worker configurations: the daemon needs none of them.

    python benchmarks/memory_matrix.py              # 8 cells x 13 groups of 3-40 files (~8-10 min here)
    python benchmarks/memory_matrix.py --quick      # 8 cells x 7 groups of 3-12 files (~4 min)
    python benchmarks/memory_matrix.py --cells none-2t,mem2000-1t

Each cell is its own real ``dask scheduler`` and two ``dask worker --memory-limit 2.5GiB``
processes (subprocesses, with nannies), started with one of the worker configurations
operators use, and ``python -m throttler serve --scheduler ...`` as a process:

* ``none``: no ``--resources`` at all (how most Dask clusters are started);
* ``mem-limit``: ``--resources MEMORY=<the memory limit in bytes>``;
* ``mem2000``: ``--resources MEMORY=2000`` (arbitrary units, as in the case study);
* ``mem0.7``: ``--resources MEMORY=<0.7 x the memory limit>`` (what the README used to ask);

each with 1 and 2 threads per worker. The same queue goes to every cell: seed-shaped
groups (50,000 paths x 120 dates = 6,000,000 rows a file; hard links of four physical
files: two with identical keys, one whose keys differ by one path, so that groupby
merges both add arrays and regroup with pandas, and one with its rows shuffled) mixing
``auto``, ``sum`` and ``groupby``. The ``mixed`` group alternates the first file and the
shuffled one: ``auto`` takes ``dense`` for it (half its files scatter-added).

Per cell: groups done / failed (and how many outputs differ from an independent pandas
group-by), pauses (the scheduler's worker status events to ``paused`` / the workers'
"Pausing worker" log lines), restarts (the nanny's ``worker-restart-memory`` events /
"exceeded 95% memory budget" log lines / workers removed), the highest worker peak RSS
over the limit (the done records' ``worker_peak_fraction``, and an independent sampling
of the worker processes' RSS every 20 ms), makespan (first request queued to last
record written, the daemon already up) and utilisation = busy thread-seconds / (threads
x makespan), busy thread-seconds being the sum of the done records' ``task_seconds``
(each task's own wall time inside the kernel, summed over the group's tasks).

Targets: 0 pauses, 0 restarts, every group done and correct, peak at most 0.75 of the
limit, makespan within 1.3x of the best cell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the tests' helpers live in the repository
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers.daemon import (  # noqa: E402
    Daemon,
    ExternalCluster,
    RssSampler,
    leaked_processes,
    records,
    serve_args,
)
from tests.helpers.datafiles import read_output, reference_sum, write_sim  # noqa: E402
from throttler.spool.queue import Spool  # noqa: E402

LIMIT_BYTES = int(2.5 * 2**30)
SEED_PATHS, SEED_DATES = 50_000, 120

#: worker configuration -> the ``--resources`` given to ``dask worker`` ("" = none)
CONFIGS = {"none": "", "mem-limit": f"MEMORY={LIMIT_BYTES}", "mem2000": "MEMORY=2000",
           "mem0.7": f"MEMORY={int(0.7 * LIMIT_BYTES)}"}
THREADS = (1, 2)

#: (group, strategy, files). auto groups link the two physical files with identical keys
#: (auto resolves to aligned), mixed-* groups the first and the shuffled one (auto resolves
#: to dense); sum and groupby groups cycle through the first three.
FULL_QUEUE = (("auto-40", "auto", 40), ("sum-30", "sum", 30), ("gb-20", "groupby", 20), ("auto-24", "auto", 24),
              ("sum-16", "sum", 16), ("gb-10", "groupby", 10), ("auto-12", "auto", 12), ("sum-8", "sum", 8),
              ("gb-6", "groupby", 6), ("auto-3", "auto", 3), ("sum-5", "sum", 5), ("gb-3", "groupby", 3),
              ("mixed-24", "auto", 24))
QUICK_QUEUE = (("auto-12", "auto", 12), ("sum-8", "sum", 8), ("gb-6", "groupby", 6), ("auto-3", "auto", 3),
               ("sum-5", "sum", 5), ("gb-3", "groupby", 3), ("mixed-6", "auto", 6))

PAUSE_LINE, RESTART_LINE = "Pausing worker", "memory budget. Restarting"


@dataclass
class Cell:
    config: str
    threads: int
    done: int = 0
    failed: int = 0
    wrong: int = 0
    pause_events: int = 0
    pause_lines: int = 0
    restart_events: int = 0
    restart_lines: int = 0
    removed: int = 0
    record_peak: float = 0.0  #: highest worker_peak_fraction of the done records
    sampled_peak: float = 0.0  #: highest sampled worker RSS / limit
    makespan_seconds: float = 0.0
    busy_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.config}-{self.threads}t"

    @property
    def utilisation(self) -> float:
        return self.busy_seconds / (2 * self.threads * self.makespan_seconds) if self.makespan_seconds else 0.0


# ============================================================================ the estate


def make_estate(root: Path, queue) -> dict[str, list[str]]:
    """Four physical seed-shaped files and each group's hard links to them."""
    physical = [write_sim(root / "p0.parquet", SEED_PATHS, SEED_DATES, seed=1),
                write_sim(root / "p1.parquet", SEED_PATHS, SEED_DATES, seed=2),
                write_sim(root / "p2.parquet", SEED_PATHS + 1, SEED_DATES, seed=3, drop_paths=(0,)),
                write_sim(root / "p3.parquet", SEED_PATHS, SEED_DATES, seed=4, shuffle=True)]
    estate = {}
    for group, strategy, n in queue:
        folder = root / "data" / group
        folder.mkdir(parents=True)
        pool = [physical[0], physical[3]] if group.startswith("mixed-") else (
            physical[:2] if strategy == "auto" else physical[:3])
        estate[group] = []
        for i in range(n):
            os.link(pool[i % len(pool)], folder / f"f{i:03d}.parquet")
            estate[group].append(str(folder / f"f{i:03d}.parquet"))
    return estate


class References:
    """The reference output of a group depends only on how many links of each physical file
    it holds: computed once per such count (reference_sum reads each physical file once)."""

    def __init__(self):
        self._cache: dict[tuple, object] = {}

    def matches(self, output: Path, paths: list[str]) -> bool:
        counts = tuple(sorted(Counter(os.stat(p).st_ino for p in paths).items()))
        if counts not in self._cache:
            self._cache[counts] = reference_sum(paths)
        want, got = self._cache[counts], read_output(output)
        if list(pq.read_schema(output).names) != ["path", "Date", "value"] or len(got) != len(want):
            return False
        scale = np.maximum(np.abs(want["value"].to_numpy()), 1.0)
        return bool(np.array_equal(got["path"].to_numpy(), want["path"].to_numpy())
                    and np.array_equal(got["Date"].to_numpy(), want["Date"].to_numpy())
                    and np.all(np.abs(got["value"].to_numpy() - want["value"].to_numpy()) < 1e-9 * scale + 1e-300))


# ============================================================================ one cell


def run_cell(cell: Cell, workdir: Path, data_root: Path, estate, queue, refs: References,
             timeout_seconds: float) -> Cell:
    """One configuration: its cluster, its daemon, the whole queue; every process gone after."""
    cell_dir = workdir / cell.name
    shutil.rmtree(cell_dir, ignore_errors=True)
    (cell_dir / "logs").mkdir(parents=True)
    cluster = ExternalCluster(cell_dir / "logs", n_workers=2, memory_bytes=LIMIT_BYTES, nthreads=cell.threads,
                              resources=CONFIGS[cell.config])
    daemon = None
    try:
        client = cluster.connect(2)
        args = serve_args(cell_dir, cluster.address)
        args[args.index("--data-root") + 1] = str(data_root)
        daemon = Daemon(args, cell_dir / "logs" / "daemon.log")
        daemon.wait_ready()
        sampler = RssSampler([p.pid for p in cluster.procs[1:]])
        spool = Spool(cell_dir / "spool")
        started = time.monotonic()
        for group, strategy, _ in queue:
            spool.submit(group, strategy=strategy)
        _wait_closed(cell_dir / "spool", len(queue), timeout_seconds, cell)
        cell.makespan_seconds = time.monotonic() - started
        cell.sampled_peak = sampler.stop() / LIMIT_BYTES
        _cluster_counts(cell, client)
    finally:
        if daemon is not None:
            daemon.kill()
        cluster.close()
    logs = "".join(p.log() for p in cluster.procs[1:])
    cell.pause_lines, cell.restart_lines = logs.count(PAUSE_LINE), logs.count(RESTART_LINE)
    _record_counts(cell, cell_dir, estate, refs)
    return cell


def _wait_closed(spool_dir: Path, expected: int, timeout_seconds: float, cell: Cell) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if len(records(spool_dir, "done")) + len(records(spool_dir, "failed")) >= expected:
            return
        time.sleep(0.2)
    cell.notes.append(f"queue not closed after {timeout_seconds:.0f} s")


def _cluster_counts(cell: Cell, client) -> None:
    events = client.get_events()
    cell.pause_events = sum(1 for topic, log in events.items() if topic.startswith("tcp://") for _, msg in log
                            if msg.get("action") == "worker-status-change" and msg.get("status") == "paused")
    cell.restart_events = len(client.get_events("worker-restart-memory"))
    cell.removed = sum(1 for topic, log in events.items() if topic.startswith("tcp://") for _, msg in log
                       if msg.get("action") == "remove-worker")  # per worker: "all" keeps only 1000 events


def _record_counts(cell: Cell, cell_dir: Path, estate, refs: References) -> None:
    done, failed = records(cell_dir / "spool", "done"), records(cell_dir / "spool", "failed")
    cell.done, cell.failed = len(done), len(failed)
    cell.wrong = sum(1 for r in done if not refs.matches(cell_dir / "out" / f"{r['group']}.parquet",
                                                          estate[r["group"]]))
    cell.record_peak = max((r["worker_peak_fraction"] or 0.0 for r in done), default=0.0)
    cell.busy_seconds = sum(r["task_seconds"] for r in done)
    cell.notes += [f"failed {r['group']}: {r['reason'][:200]}" for r in failed]
    cell.notes += [f"{r['group']} took {r['attempts']} attempts" for r in done if r["attempts"] > 1]


# ============================================================================ the table


COLUMNS = ("cell", "done / failed (wrong)", "pauses (events / log)", "restarts (events / log / removed)",
           "peak RSS / limit (records / sampled)", "makespan s", "x best", "utilisation")


def table(cells: list[Cell]) -> str:
    best = min((c.makespan_seconds for c in cells if c.makespan_seconds), default=0.0)
    rows = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for c in cells:
        ratio = c.makespan_seconds / best if best else 0.0
        rows.append(f"| {c.name} | {c.done} / {c.failed} ({c.wrong}) | {c.pause_events} / {c.pause_lines} | "
                    f"{c.restart_events} / {c.restart_lines} / {c.removed} | {c.record_peak:.3f} / "
                    f"{c.sampled_peak:.3f} | {c.makespan_seconds:.1f} | {ratio:.2f} | {c.utilisation:.2f} |")
    return "\n".join(rows)


def misses(cells: list[Cell], n_groups: int) -> list[str]:
    """Every target a cell misses, said plainly."""
    best = min((c.makespan_seconds for c in cells if c.makespan_seconds), default=0.0)
    out = []
    for c in cells:
        if c.done != n_groups or c.failed or c.wrong:
            out.append(f"{c.name}: {c.done} of {n_groups} done, {c.failed} failed, {c.wrong} wrong")
        if c.pause_events or c.pause_lines:
            out.append(f"{c.name}: {c.pause_events} pause events, {c.pause_lines} pause log lines")
        if c.restart_events or c.restart_lines or c.removed:
            out.append(f"{c.name}: {c.restart_events} memory restarts, {c.removed} workers removed")
        if c.record_peak > 0.75:
            out.append(f"{c.name}: worker peak {c.record_peak:.3f} of the limit (> 0.75)")
        if best and c.makespan_seconds > 1.3 * best:
            out.append(f"{c.name}: makespan {c.makespan_seconds / best:.2f}x the best cell (> 1.3)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 groups of 3-12 files instead of 13 of 3-40")
    parser.add_argument("--cells", default=None, help="comma-separated cell names (default: all 8), e.g. none-2t")
    parser.add_argument("--workdir", default=None, help="keep data, spools and logs here (default: a temp dir)")
    parser.add_argument("--timeout-seconds", type=float, default=900.0, help="per cell, for the queue to close")
    args = parser.parse_args(argv)
    queue = QUICK_QUEUE if args.quick else FULL_QUEUE
    cells = [Cell(config, threads) for config in CONFIGS for threads in THREADS]
    if args.cells:
        wanted = {n.strip() for n in args.cells.split(",")}
        cells = [c for c in cells if c.name in wanted]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="throttler-memory-matrix-"))
    estate_root = workdir / "estate"
    shutil.rmtree(estate_root, ignore_errors=True)
    estate_root.mkdir(parents=True)
    estate, refs = make_estate(estate_root, queue), References()
    print(f"queue: {', '.join(f'{g} ({s}, {n} files)' for g, s, n in queue)}; 2 workers x "
          f"{LIMIT_BYTES / 2**30:.1f} GiB", file=sys.stderr, flush=True)
    for cell in cells:
        run_cell(cell, workdir, estate_root / "data", estate, queue, refs, args.timeout_seconds)
        print(f"   {cell.name}: {cell.done} done, {cell.failed} failed in {cell.makespan_seconds:.1f} s; "
              + "; ".join(cell.notes), file=sys.stderr, flush=True)
    print(table(cells))
    missed = misses(cells, len(queue))
    print("\ntargets: " + ("every cell meets them" if not missed else "MISSED:\n- " + "\n- ".join(missed)))
    leaked = leaked_processes()
    if leaked:
        print(f"processes left behind: {leaked}", file=sys.stderr)
    if not missed and not leaked and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not missed and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())

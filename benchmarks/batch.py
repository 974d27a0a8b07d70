"""One batch of groups on a real local Dask cluster, run four ways, side by side.

    python benchmarks/batch.py --quick                     # smoke run: tiny files (~2 min)
    python benchmarks/batch.py                             # 730+ files x 6M rows, strategy sum (~25 min)
    python benchmarks/batch.py --strategy auto --ways c,d  # the aligned path, two ways only

Every way starts from a fresh cluster (``dask scheduler`` + 2 ``dask worker``
processes, 1 thread and 4 GB each, declaring ``MEMORY=4e9``) and runs the same
groups with the same per-group graphs (:func:`throttler.planning.planner.make_plan` for
the cluster's shape, :func:`throttler.worker.graphs.build`); only the submission
policy differs:

* ``a``  every group at once, ``client.compute`` of all graphs, no restrictions;
* ``bN`` the seed's thread pool: N threads each submit one group and wait for it;
* ``c``  every group at once, each with ``resources={"MEMORY": plan.task_peak_bytes}``;
* ``d``  ``throttler serve --scheduler``: requests dropped into its spool at once.

The makespan runs from the moment the batch is handed over to the last group's
end: ways (a)-(c) read the files' footers, plan and build their graphs inside
it, as the daemon must. Every way also reports the CPU seconds its
orchestration took (the benchmark process; for (d) the daemon's too): on a
machine with as many cores as worker threads, those seconds are taken from
the workers.

A scheduler plugin records task compute intervals, worker arrivals, removals
and status changes (pauses); a thread samples worker memory every 0.2 s, as the
scheduler sees it (heartbeats) and as ``psutil`` sees it. Every output is
checked against the sum of its input files. One markdown table per strategy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import cloudpickle
import psutil
import pyarrow.parquet as pq
from distributed import Client, as_completed
from distributed.diagnostics.plugin import SchedulerPlugin

from throttler.cluster.scheduler import read_snapshot
from throttler.commands.generate import EstateSpec, group_sizes, write_estate
from throttler.planning import planner
from throttler.planning.estimator import Estimator
from throttler.planning.footers import file_info
from throttler.planning.memory_model import naive_group_bytes
from throttler.worker import graphs

N_WORKERS = 2
DEFAULT_THREADS_PER_WORKER = 1
WORKER_MEMORY_BYTES = 4_000_000_000  #: memory_limit and the MEMORY resource of each worker
CLUSTER_MEMORY_BYTES = N_WORKERS * WORKER_MEMORY_BYTES
PHYSICAL_FILES = 8  #: distinct files written; every other file is a hard link to one of them
SAMPLE_SECONDS = 0.2
RECORDER_NAME = "batch-recorder"
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "bench-data" / "batch"  #: git-ignored
CHILD_ENV = {"DASK_LOGGING__DISTRIBUTED": "warning", "PYTHONUNBUFFERED": "1"}
KEY_RE = re.compile(r"^throttler-\w+-(?P<token>[0-9a-f]+)-"
                    r"(?:leaf-(?P<leaf>\d+)|combine-(?P<depth>\d+)-(?P<index>\d+)|(?P<final>final))$")
WAY_LABELS = {"a": "(a) all at once, Dask defaults", "c": "(c) all at once + MEMORY resources",
              "d": "(d) throttler serve"}


def way_label(way: str) -> str:
    return f"(b) thread pool, N={way[1:]}" if way.startswith("b") else WAY_LABELS[way]


# --------------------------------------------------------------------------- the estate


@dataclass(frozen=True)
class Estate:
    root: Path
    groups: dict[str, list[str]]  #: group -> absolute file paths, in generation order
    expected: dict[str, float]  #: group -> sum of every value of its files
    rows: int  #: rows per file


def estate_spec(args) -> EstateSpec:
    """The fewest groups whose long-tailed sizes reach ``--files`` (the largest forced to ``--largest``)."""
    for n_groups in range(1, args.files + 1):
        spec = EstateSpec(groups=n_groups, max_files=args.largest, min_files=2, paths=args.paths,
                          dates=args.dates, seed=args.seed, physical_files=PHYSICAL_FILES)
        if sum(group_sizes(spec)) >= args.files:
            return spec
    raise ValueError(f"cannot reach {args.files} files")


def ensure_estate(args) -> Estate:
    spec = estate_spec(args)
    root = Path(args.data) / f"{args.files}f-{args.largest}max-{args.paths}x{args.dates}-s{args.seed}"
    if not (root / "manifest.csv").exists():  # written last: its presence means complete
        log(f"generating {sum(group_sizes(spec))} files in {spec.groups} groups under {root}")
        write_estate(root, spec)
    groups = {f"g{g:05d}": [str((root / f"g{g:05d}" / f"sim-{i:05d}.parquet").resolve()) for i in range(n)]
              for g, n in enumerate(group_sizes(spec))}
    return Estate(root, groups, expected_sums(groups), args.paths * args.dates)


def expected_sums(groups: dict[str, list[str]]) -> dict[str, float]:
    """Each group's total of ``value``, from one read per physical file (hard links share an inode)."""
    by_inode: dict[int, float] = {}
    totals = {}
    for group, files in groups.items():
        total = 0.0
        for path in files:
            inode = os.stat(path).st_ino
            if inode not in by_inode:
                by_inode[inode] = float(pq.read_table(path, columns=["value"])["value"].to_numpy().sum())
            total += by_inode[inode]
        totals[group] = total
    return totals


def warm_page_cache(estate: Estate) -> int:
    seen, total = set(), 0
    for files in estate.groups.values():
        for path in files:
            if os.stat(path).st_ino not in seen:
                seen.add(os.stat(path).st_ino)
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        total += len(chunk)
    return total


def describe_estate(estate: Estate) -> tuple[list[str], dict[str, list]]:
    """Lines about the estate's size against the cluster, and every file's footer."""
    infos = {g: [file_info(p) for p in files] for g, files in estate.groups.items()}
    naive = {g: naive_group_bytes(i) for g, i in infos.items()}
    sizes = sorted((len(f) for f in estate.groups.values()), reverse=True)
    largest = max(naive, key=naive.get)
    lines = [
        f"estate: {sum(sizes)} files ({estate.rows:,} rows, {infos[largest][0].size_bytes / 1e6:.1f} MB each; "
        f"{PHYSICAL_FILES} physical, the rest hard links) in {len(sizes)} groups; sizes {sizes[:6]} ... "
        f"median {sizes[len(sizes) // 2]}, smallest {sizes[-1]}",
        f"naive estimate (files x size x expansion): total {sum(naive.values()) / 1e9:.1f} GB = "
        f"{sum(naive.values()) / CLUSTER_MEMORY_BYTES:.1f}x the cluster's {CLUSTER_MEMORY_BYTES / 1e9:.0f} GB; "
        f"largest group {largest} ({len(estate.groups[largest])} files, position "
        f"{list(estate.groups).index(largest) + 1} of {len(sizes)}) {naive[largest] / 1e9:.1f} GB = "
        f"{naive[largest] / CLUSTER_MEMORY_BYTES:.2f}x the cluster",
    ]
    return lines, infos


# --------------------------------------------------------------------------- the cluster


class Recorder(SchedulerPlugin):
    """Runs in the scheduler: task compute intervals, submissions, worker arrivals, removals, pauses."""

    name = RECORDER_NAME
    WATCHED = ("add-worker", "remove-worker", "worker-status-change")

    def __init__(self):
        self.events: list[tuple] = []  #: (time, action, worker, status)
        self.computes: list[tuple] = []  #: (key, finish state, worker, start, stop)
        self.graphs: list[tuple] = []  #: (time, number of tasks) per update_graph

    def log_event(self, topic, msg):
        if not isinstance(msg, dict) or msg.get("action") not in self.WATCHED:
            return
        if msg["action"] == "worker-status-change":
            self.events.append((time.time(), msg["action"], topic, msg.get("status")))
        elif topic == "all":  # add/remove are logged under the worker's topic and under "all"
            self.events.append((time.time(), msg["action"], msg.get("worker"), None))

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs):
        """A finished task's compute interval, ending when the scheduler hears of it.

        The worker's start and stop carry its estimate of the scheduler's clock
        offset, which jitters by tens of milliseconds under load (tasks of one
        1-thread worker then seem to overlap); their difference is exact, and
        the scheduler's own clock orders tasks across workers.
        """
        if start != "processing":
            return
        now = time.time()
        for ss in kwargs.get("startstops") or ():
            if ss.get("action") == "compute":
                self.computes.append((str(key), finish, kwargs.get("worker"), now - (ss["stop"] - ss["start"]), now))

    def update_graph(self, scheduler, *, tasks=(), **kwargs):
        self.graphs.append((time.time(), len(tasks)))


if __name__ != "__main__":  # imported: ship this module's plugin and functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def dump_recorder(dask_scheduler):
    plugin = dask_scheduler.plugins["batch-recorder"]
    return {"events": list(plugin.events), "computes": list(plugin.computes), "graphs": list(plugin.graphs)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A command in its own session (its group holds every child), output to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None):
        self.argv, self.log_path = argv, log_path
        with open(log_path, "ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **CHILD_ENV, **(env or {})}, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """SIGTERM this command's process group, SIGKILL it if still there after the timeout."""
        for sig, wait in ((signal.SIGTERM, timeout_seconds), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                if not _group_alive(self.popen.pid):
                    return
                time.sleep(0.5)
            except subprocess.TimeoutExpired:
                continue


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Cluster:
    """``dask scheduler`` + ``dask worker`` processes (nanny, 1 thread, 4 GB, MEMORY=limit)."""

    def __init__(self, log_dir: Path, work_dir: Path, threads_per_worker: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.procs = [Proc(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                           log_dir / "scheduler.log")]
        self.nannies = [Proc(["dask", "worker", self.address, "--nthreads", str(threads_per_worker),
                              "--memory-limit", str(WORKER_MEMORY_BYTES), "--no-dashboard", "--name", f"w{i}",
                              "--resources", f"MEMORY={WORKER_MEMORY_BYTES}", "--local-directory", str(work_dir)],
                             log_dir / f"worker{i}.log") for i in range(N_WORKERS)]
        self.procs += self.nannies
        self.client: Client | None = None

    def connect(self, timeout_seconds: float = 60.0) -> Client:
        deadline = time.monotonic() + timeout_seconds
        while self.client is None:
            try:
                self.client = Client(self.address, timeout="2s")
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.client.wait_for_workers(N_WORKERS, timeout=max(1.0, deadline - time.monotonic()))
        self.client.register_plugin(Recorder(), name=RECORDER_NAME)
        self.client.run(lambda: __import__("throttler.worker.kernels") and None)  # imports out of the timing
        return self.client

    def worker_rss_bytes(self) -> list[int]:
        """Each worker process's RSS now (the largest child of each nanny; a restart is a new child)."""
        out = []
        for nanny in self.nannies:
            try:
                children = psutil.Process(nanny.popen.pid).children(recursive=True)
                out.append(max((c.memory_info().rss for c in children), default=0))
            except psutil.Error:
                out.append(0)
        return out

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception:  # noqa: BLE001 - teardown goes on regardless
                pass
        for proc in reversed(self.procs):
            proc.stop()


class Sampler:
    """Worker memory every 0.2 s: the scheduler's view (heartbeats) and each process's RSS (psutil)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.peak_heartbeat = self.peak_rss = 0.0  #: fractions of the memory limit
        self.paused_samples = 0
        self.peak_managed = 0.0  #: task results held on one worker, as a fraction of its limit
        self.samples: list[tuple] = []  #: (time, worker, process bytes, managed bytes, tasks processing)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                snap = read_snapshot(self.cluster.client)
                for w in snap.workers:
                    self.samples.append((time.time(), w.name, w.process_bytes, w.managed_bytes, w.processing))
                    if w.memory_limit_bytes:
                        self.peak_heartbeat = max(self.peak_heartbeat, w.process_bytes / w.memory_limit_bytes)
                        self.peak_managed = max(self.peak_managed, w.managed_bytes / w.memory_limit_bytes)
                    self.paused_samples += w.status == "paused"
            except Exception:  # noqa: BLE001 - a missed sample is not a failed run
                pass
            rss = self.cluster.worker_rss_bytes()
            self.peak_rss = max([self.peak_rss] + [r / WORKER_MEMORY_BYTES for r in rss])


# --------------------------------------------------------------------------- the ways


@dataclass
class GroupResult:
    group: str
    ok: bool
    end_seconds: float  #: time.time() when the submitter learned the outcome
    error: str = ""


@dataclass
class WayRun:
    way: str
    start_seconds: float
    results: dict[str, GroupResult]
    output_dir: Path
    notes: list[str] = field(default_factory=list)
    daemon_cpu_seconds: float = 0.0  #: (d): the daemon process's CPU seconds over the makespan


def plan_groups(estate: Estate, infos: dict, client: Client, args, strategy: str) -> dict:
    """group -> Plan for this cluster's shape (the daemon plans the same way)."""
    shape = read_snapshot(client).shape()
    estimator = Estimator(None)
    return {g: planner.make_plan(g, infos[g], strategy, shape, estimator,
                                 memory_fraction=args.memory_fraction, fan_in=args.fan_in)
            for g in estate.groups}


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}"


def collect(futures: dict, deadline: float) -> dict[str, GroupResult]:
    """Wait for futures (group -> future) until ``deadline``; the rest fail as timed out."""
    by_key = {f.key: g for g, f in futures.items()}
    results: dict[str, GroupResult] = {}
    try:
        for fut in as_completed(list(futures.values()), timeout=max(1.0, deadline - time.time())):
            group = by_key[fut.key]
            try:
                fut.result()
                results[group] = GroupResult(group, True, time.time())
            except Exception as exc:  # noqa: BLE001 - counted per group
                results[group] = GroupResult(group, False, time.time(), describe_error(exc))
    except TimeoutError:
        pass
    for group, fut in futures.items():
        if group not in results:
            fut.cancel()
            results[group] = GroupResult(group, False, time.time(), "timed out")
    return results


def plan_and_build(estate: Estate, client: Client, args, strategy: str, reference: dict,
                   out: Path) -> tuple[dict, dict]:
    """What a client of ways (a)-(c) must do before it submits, as the daemon does inside
    its own makespan: read every footer, plan, build the graphs. Returns (plans, graphs)."""
    infos = {g: [file_info(p) for p in files] for g, files in estate.groups.items()}
    plans = plan_groups(estate, infos, client, args, strategy)
    if {g: _plan_key(p) for g, p in plans.items()} != {g: _plan_key(p) for g, p in reference.items()}:
        raise RuntimeError("planning in the way's timer gave other plans than the reference planning")
    return plans, {g: graphs.build(p, str(out / f"{g}.parquet")) for g, p in plans.items()}


def run_all_at_once(client: Client, estate: Estate, reference: dict, out: Path, timeout: float,
                    with_resources: bool, args, strategy: str) -> WayRun:
    """(a) one ``client.compute`` of every graph; (c) one per group, each with its MEMORY restriction."""
    start = time.time()
    plans, built = plan_and_build(estate, client, args, strategy, reference, out)
    if with_resources:
        futures = {g: client.compute(b.final, resources={"MEMORY": float(plans[g].task_peak_bytes)})
                   for g, b in built.items()}
    else:
        futures = dict(zip(built, client.compute([b.final for b in built.values()])))
    return WayRun("c" if with_resources else "a", start, collect(futures, start + timeout), out)


def run_pool(client: Client, estate: Estate, reference: dict, out: Path, timeout: float, n_threads: int,
             args, strategy: str) -> WayRun:
    """(b) the seed's thread pool: each thread submits one group and waits for it."""
    start = time.time()
    _plans, built = plan_and_build(estate, client, args, strategy, reference, out)
    deadline = start + timeout

    def one(group: str) -> GroupResult:
        remaining = deadline - time.time()
        if remaining <= 0:
            return GroupResult(group, False, time.time(), "timed out")
        future = client.compute(built[group].final)
        try:
            future.result(timeout=remaining)
            return GroupResult(group, True, time.time())
        except Exception as exc:  # noqa: BLE001 - counted per group
            future.cancel()
            return GroupResult(group, False, time.time(), describe_error(exc))

    with ThreadPoolExecutor(n_threads) as pool:
        results = {r.group: r for r in pool.map(one, list(built))}
    return WayRun(f"b{n_threads}", start, results, out)


def run_daemon(cluster: Cluster, plans: dict, base: Path, timeout: float, args, strategy: str,
               data_root: Path) -> WayRun:
    """(d) ``throttler serve --scheduler``: every request dropped into its spool at once."""
    spool, out = base / "spool", base / "out"
    argv = [sys.executable, "-m", "throttler", "serve", "--scheduler", cluster.address, "--spool", str(spool),
            "--data-root", str(data_root), "--output", str(out), "--metrics-address", "127.0.0.1:0",
            "--strategy", strategy, "--memory-fraction", str(args.memory_fraction),
            *shlex.split(args.daemon_args)]
    daemon = Proc(argv, base / "daemon.log")
    try:
        wait_until(lambda: "serving spool" in daemon.log() or daemon.popen.poll() is not None, 60)
        if daemon.popen.poll() is not None:
            raise RuntimeError(f"daemon exited: {daemon.log()[-2000:]}")
        cpu_at_start = sum(psutil.Process(daemon.popen.pid).cpu_times()[:2])
        start = time.time()
        for group in plans:  # JSON naming the strategy: a plain request runs `auto`, whatever --strategy says
            (spool / "tmp" / f"{group}.json").write_text(json.dumps({"group": group, "strategy": strategy}))
            os.rename(spool / "tmp" / f"{group}.json", spool / "incoming" / f"{group}.json")
        wait_until(lambda: len(daemon_records(spool)) >= len(plans), timeout)
        results = daemon_records(spool)
        daemon_cpu = sum(psutil.Process(daemon.popen.pid).cpu_times()[:2]) - cpu_at_start
    finally:
        daemon.stop(timeout_seconds=30)
    for group in plans:
        results.setdefault(group, GroupResult(group, False, time.time(), "timed out"))
    run = WayRun("d", start, results, out, daemon_cpu_seconds=daemon_cpu)
    run.notes += daemon_notes(spool, plans, daemon.log())
    return run


def wait_until(predicate, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def daemon_records(spool: Path) -> dict[str, GroupResult]:
    """Finished groups from done/ and failed/; the end time is the record's mtime."""
    results = {}
    for kind in ("done", "failed"):
        for path in (spool / kind).glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written
            group = record.get("group")
            if group:
                results[group] = GroupResult(group, kind == "done", path.stat().st_mtime,
                                             "" if kind == "done" else str(record.get("reason"))[:160])
    return results


def daemon_notes(spool: Path, plans: dict, daemon_log: str) -> list[str]:
    """What the daemon's records say: admission waits, and whether it planned as we did."""
    done = [json.loads(p.read_text()) for p in (spool / "done").glob("*.json")]
    if not done:
        return ["daemon: no done records"]
    same = sum(1 for r in done if (r["files_per_task"], r["leaf_tasks"], r["task_estimate_bytes"],
                                   r["estimate_bytes"]) == _plan_key(plans[r["group"]]))
    waits = sorted(r["admission_wait_seconds"] for r in done)
    attempts = sum(r["attempts"] - 1 for r in done)
    return [f"daemon: {same}/{len(done)} groups planned exactly as the other ways (files per leaf, leaves, "
            f"task and group estimates); retries {attempts}; admission wait median {waits[len(waits) // 2]:.1f} s, "
            f"max {waits[-1]:.1f} s; 'submitted' log lines {daemon_log.count(' submitted ')}"]


def _plan_key(plan) -> tuple:
    return plan.files_per_task, plan.n_leaf_tasks, plan.task_peak_bytes, plan.group_peak_bytes


# --------------------------------------------------------------------------- measures


@dataclass
class Row:
    way: str
    makespan: float
    ok: int
    failed: int
    deaths: int
    restarts: int
    paused: float
    peak_heartbeat: float
    peak_rss: float
    threads: int  #: worker threads of the cluster
    work: float  #: busy thread-seconds: the sum of task compute durations
    critical_path: float  #: the longest chain of one submission's task durations
    wrong_outputs: int
    diagnostics: list[str] = field(default_factory=list)
    round: int = 1

    @property
    def utilisation(self) -> float:
        return self.work / (self.threads * self.makespan) if self.makespan > 0 else 0.0

    @property
    def lower_bound(self) -> float:
        return max(self.work / self.threads, self.critical_path)


def clip(start: float, stop: float, lo: float, hi: float) -> float:
    return max(0.0, min(stop, hi) - max(start, lo))


def paused_seconds(events: list[tuple], lo: float, hi: float) -> float:
    """Seconds workers spent paused within [lo, hi], from status changes and removals."""
    since: dict[str, float] = {}
    total = 0.0
    for t, action, worker, status in sorted(events, key=lambda e: e[0]):
        if action == "worker-status-change" and status == "paused":
            since.setdefault(worker, t)
        elif worker in since and (action == "remove-worker" or status != "paused"):
            total += clip(since.pop(worker), t, lo, hi)
    return total + sum(clip(t, hi, lo, hi) for t in since.values())


def critical_path_seconds(computes: list[tuple], fan_in: int) -> float:
    """The longest chain of task durations of any one submission (leaves -> combines -> final)."""
    by_token: dict[str, dict] = {}
    for key, finish, _worker, start, stop in computes:
        m = KEY_RE.match(key)
        if m and finish == "memory":
            node = ("leaf", int(m["leaf"])) if m["leaf"] else \
                ("final", 0) if m["final"] else (int(m["depth"]), int(m["index"]))
            by_token.setdefault(m["token"], {})[node] = stop - start
    return max((_chain(tasks, fan_in) for tasks in by_token.values()), default=0.0)


def _chain(tasks: dict, fan_in: int) -> float:
    level = {i: d for (kind, i), d in tasks.items() if kind == "leaf"}
    depth = 1
    while any(kind == depth for kind, _ in tasks):
        level = {i: d + max((level.get(j, 0.0) for j in range(i * fan_in, (i + 1) * fan_in)), default=0.0)
                 for (kind, i), d in tasks.items() if kind == depth}
        depth += 1
    return tasks.get(("final", 0), 0.0) + max(level.values(), default=0.0)


def concurrency_profile(computes: list[tuple], lo: float, hi: float) -> dict[int, float]:
    """Seconds of [lo, hi] during which k threads were computing, for each k."""
    edges = sorted([(max(lo, s), 1) for *_, s, e in computes if e > lo and s < hi]
                   + [(min(hi, e), -1) for *_, s, e in computes if e > lo and s < hi])
    out: dict[int, float] = {}
    busy, last = 0, lo
    for t, delta in edges:
        out[busy] = out.get(busy, 0.0) + (t - last)
        busy, last = busy + delta, t
    out[busy] = out.get(busy, 0.0) + (hi - last)
    return out


def peak_waiting_results(computes: list[tuple]) -> int:
    """The most leaf results held at once that were waiting for their submission's final task."""
    final_done = {m["token"]: stop for key, _f, _w, _s, stop in computes if (m := KEY_RE.match(key)) and m["final"]}
    edges = sorted(edge for key, _f, _w, _s, stop in computes if (m := KEY_RE.match(key)) and m["leaf"]
                   for edge in ((stop, 1), (final_done.get(m["token"], math.inf), -1)))
    held = peak = 0
    for _t, delta in edges:
        held += delta
        peak = max(peak, held)
    return peak


def check_outputs(run: WayRun, estate: Estate) -> int:
    """Outputs of groups reported ok whose rows or total disagree with their inputs."""
    wrong = 0
    for group, result in run.results.items():
        if not result.ok:
            continue
        try:
            table = pq.read_table(run.output_dir / f"{group}.parquet", columns=["value"])
            total = float(table["value"].to_numpy().sum())
            n_files = len(estate.groups[group])
            good = table.num_rows == estate.rows and math.isclose(
                total, estate.expected[group], rel_tol=1e-9, abs_tol=1e-9 * estate.rows * n_files)
        except OSError:
            good = False
        wrong += not good
    return wrong


def measure(run: WayRun, record: dict, sampler: Sampler, estate: Estate, fan_in: int, threads: int) -> Row:
    end = max(r.end_seconds for r in run.results.values())
    lo, hi = run.start_seconds, end
    computes = [c for c in record["computes"] if c[4] > lo and c[3] < hi + 5]
    work = sum(clip(c[3], c[4], lo, hi) for c in computes)
    events = [e for e in record["events"] if lo <= e[0] <= hi]
    failed = [r for r in run.results.values() if not r.ok]
    row = Row(run.way, hi - lo, len(run.results) - len(failed), len(failed),
              sum(e[1] == "remove-worker" for e in events), sum(e[1] == "add-worker" for e in events),
              paused_seconds(record["events"], lo, hi), sampler.peak_heartbeat, sampler.peak_rss, threads, work,
              critical_path_seconds(computes, fan_in), check_outputs(run, estate))
    profile = concurrency_profile(computes, lo, hi)
    shares = ", ".join(f"{k} busy {v / (hi - lo):.0%}" for k, v in sorted(profile.items(), reverse=True))
    row.diagnostics.append(f"{way_label(run.way)}: threads computing over the makespan: {shares}; "
                           f"{len(record['graphs'])} graph submissions; paused samples {sampler.paused_samples}; "
                           f"peak managed memory {sampler.peak_managed:.2f} of the limit; at most "
                           f"{peak_waiting_results(computes)} leaf results waited for their final task at once")
    errors = sorted({r.error for r in failed})
    if errors:
        row.diagnostics.append(f"{way_label(run.way)}: failures: " + " | ".join(errors[:3]))
    row.diagnostics += [f"{way_label(run.way)}: {n}" for n in run.notes]
    return row


# --------------------------------------------------------------------------- driver


def run_way(way: str, estate: Estate, infos: dict, args, strategy: str) -> Row:
    base = Path(args.data) / "runs" / f"{strategy}-{args.threads_per_worker}t" / way
    shutil.rmtree(base, ignore_errors=True)
    (base / "out").mkdir(parents=True)
    cluster = Cluster(base / "logs", base / "dask-work", args.threads_per_worker)
    try:
        client = cluster.connect()
        plans = plan_groups(estate, infos, client, args, strategy)
        load_before = os.getloadavg()[0]
        with Sampler(cluster) as sampler:
            cpu_before = time.process_time()
            run = dispatch(way, cluster, plans, base, args, strategy, estate)
            client_cpu = time.process_time() - cpu_before
        time.sleep(1.5)  # the last heartbeats and status changes reach the scheduler
        record = client.run_on_scheduler(dump_recorder)
        (base / "record.json").write_text(json.dumps(  # the raw figures, for a closer look afterwards
            {**record, "start": run.start_seconds, "results": [vars(r) for r in run.results.values()],
             "samples": sampler.samples}))
        row = measure(run, record, sampler, estate, args.fan_in, N_WORKERS * args.threads_per_worker)
        row.diagnostics.append(f"{way_label(way)}: load average (1 min) {load_before:.1f} before, "
                               f"{os.getloadavg()[0]:.1f} after; CPU seconds of the orchestration: "
                               f"benchmark process {client_cpu:.1f} (its 0.2 s sampler included)"
                               + (f", daemon process {run.daemon_cpu_seconds:.1f}" if way == "d" else ""))
        return row
    finally:
        cluster.close()
        shutil.rmtree(base / "out", ignore_errors=True)
        shutil.rmtree(base / "dask-work", ignore_errors=True)


def dispatch(way: str, cluster: Cluster, plans: dict, base: Path, args, strategy: str, estate: Estate) -> WayRun:
    client, out, timeout = cluster.client, base / "out", args.way_timeout_seconds
    if way in ("a", "c"):
        return run_all_at_once(client, estate, plans, out, timeout, way == "c", args, strategy)
    if way.startswith("b"):
        return run_pool(client, estate, plans, out, timeout, int(way[1:]), args, strategy)
    if way == "d":
        return run_daemon(cluster, plans, base, timeout, args, strategy, estate.root)
    raise ValueError(f"unknown way {way!r}")


def render(strategy: str, rows: list[Row]) -> str:
    head = ("| way | makespan s | groups ok/failed | worker deaths/restarts | paused s | peak memory/limit "
            "(heartbeat; RSS every 0.2 s) | utilisation | work thread-s | lower bound s | makespan/LB |")
    lines = [f"### strategy `{strategy}`", "", head, "|" + "---|" * 10]
    rounds = len({r.round for r in rows}) > 1
    for r in rows:
        lines.append(
            f"| {way_label(r.way)}{f', round {r.round}' if rounds else ''} | {r.makespan:.1f} | {r.ok}/{r.failed} | {r.deaths}/{r.restarts} | "
            f"{r.paused:.1f} | {r.peak_heartbeat:.2f}; {r.peak_rss:.2f} | {r.utilisation:.0%} | {r.work:.0f} | "
            f"{r.lower_bound:.1f} ({'work/threads' if r.work / r.threads >= r.critical_path else 'critical path'}) "
            f"| {r.makespan / r.lower_bound if r.lower_bound else float('nan'):.2f} |")
    wrong = [f"{way_label(r.way)}: {r.wrong_outputs}" for r in rows if r.wrong_outputs]
    lines += ["", "Outputs checked against the sum of their inputs: "
              + ("all correct." if not wrong else "WRONG " + ", ".join(wrong))]
    return "\n".join(lines)


def by_way(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.way, []).append(r)
    return out


def render_medians(rows: list[Row]) -> str:
    """Medians over rounds, and each way's makespan over (d)'s in the same round (paired)."""
    ways = by_way(rows)
    d_by_round = {r.round: r.makespan for r in ways.get("d", [])}
    lines = [f"Medians of {max(r.round for r in rows)} rounds:", "",
             "| way | makespan s (median) | min-max | utilisation (median) | deaths/restarts (all rounds) | "
             "failed (all rounds) | makespan/LB (median) | makespan / (d)'s, same round (median) |",
             "|" + "---|" * 8]
    for way, runs in ways.items():
        spans = [r.makespan for r in runs]
        paired = [r.makespan / d_by_round[r.round] for r in runs if r.round in d_by_round]
        lines.append(
            f"| {way_label(way)} | {median(spans):.1f} | {min(spans):.1f}-{max(spans):.1f} | "
            f"{median([r.utilisation for r in runs]):.0%} | {sum(r.deaths for r in runs)}/"
            f"{sum(r.restarts for r in runs)} | {sum(r.failed for r in runs)} | "
            f"{median([r.makespan / r.lower_bound for r in runs if r.lower_bound]):.2f} | "
            f"{f'{median(paired):.3f}' if paired else '-'} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    """The targets for (d), checked on medians over rounds (one round: its figures)."""
    ways = by_way(rows)
    if "d" not in ways:
        return []
    d = ways.pop("d")
    d_span = median([r.makespan for r in d])
    clean = {w: median([r.makespan for r in runs]) for w, runs in ways.items()
             if all(r.deaths == 0 and r.failed == 0 for r in runs)}
    best = min(clean, key=clean.get, default=None)
    checks = [("zero deaths, restarts and pauses", all(r.deaths == r.restarts == 0 and r.paused == 0 for r in d)),
              ("utilisation >= 85%", median([r.utilisation for r in d]) >= 0.85),
              ("within 1.25x of the lower bound", median([r.makespan / r.lower_bound for r in d]) <= 1.25)]
    if best is not None:
        checks.append((f"makespan <= best clean other way ({way_label(best)}, {clean[best]:.1f} s; "
                       f"(d) {d_span:.1f} s)", d_span <= clean[best]))
    return [f"- target for (d): {name}: {'met' if ok else 'MISSED'}" for name, ok in checks]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ways", default="a,b,c,d", help="any of a,b,c,d (b runs once per --pool-threads)")
    p.add_argument("--strategy", default="sum", help="sum, auto, or both as sum,auto (one table each)")
    p.add_argument("--files", type=int, help="files in the estate, at least (default 730; quick 60)")
    p.add_argument("--largest", type=int, help="files of the largest group (default 160; quick 16)")
    p.add_argument("--pool-threads", default="2,4", help="thread counts of way (b), comma-separated")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every way (the order rotates each round); with 2 or more, a table of medians")
    p.add_argument("--quick", action="store_true", help="tiny files (2,000 paths x 100 dates): a smoke run")
    p.add_argument("--paths", type=int)
    p.add_argument("--dates", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-fraction", type=float, default=planner.DEFAULT_MEMORY_FRACTION,
                   help="planning (every way) and the daemon's admission")
    p.add_argument("--fan-in", type=int, default=planner.DEFAULT_FAN_IN)
    p.add_argument("--threads-per-worker", type=int, default=DEFAULT_THREADS_PER_WORKER,
                   help="more than 1 puts several ~0.85 GB sum tasks on a 4 GB worker at once")
    p.add_argument("--daemon-args", default="", help="more `throttler serve` flags, e.g. '--poll-seconds 0.05'")
    p.add_argument("--way-timeout-seconds", type=float, help="per way (default 900; quick 180)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("files", 730, 60), ("largest", 160, 16), ("paths", 50_000, 2_000),
                              ("dates", 120, 100), ("way_timeout_seconds", 900.0, 180.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def expand_ways(args) -> list[str]:
    ways = []
    for way in args.ways.split(","):
        way = way.strip()
        ways += [f"b{n}" for n in args.pool_threads.split(",")] if way == "b" else [way]
    return ways


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    estate = ensure_estate(args)
    lines, infos = describe_estate(estate)
    warmed = warm_page_cache(estate)
    header = lines + [f"cluster: {N_WORKERS} workers x {WORKER_MEMORY_BYTES / 1e9:.0f} GB x {args.threads_per_worker} "
                      f"thread(s), MEMORY={WORKER_MEMORY_BYTES}; {os.cpu_count()} cores; page cache warm "
                      f"({warmed / 1e6:.0f} MB of distinct files); memory_fraction {args.memory_fraction}, "
                      f"fan-in {args.fan_in}; daemon flags: {args.daemon_args or '(defaults)'}"]
    for line in header:
        log(line)
    tables = []
    for strategy in args.strategy.split(","):
        rows = []
        ways = expand_ways(args)
        for round_index in range(args.repeat):
            shift = round_index % len(ways)  # rotate, so no way always runs first or last
            for way in ways[shift:] + ways[:shift]:
                log(f"{strategy}: round {round_index + 1}/{args.repeat}, way {way_label(way)} ...")
                rows.append(run_way(way, estate, infos, args, strategy))
                r = rows[-1]
                r.round = round_index + 1
                log(f"  makespan {r.makespan:.1f} s, ok {r.ok}, failed {r.failed}, deaths {r.deaths}, "
                    f"utilisation {r.utilisation:.0%}, LB {r.lower_bound:.1f} s")
        tables.append((strategy, rows))
    print("\n".join(header))
    for strategy, rows in tables:
        print()
        print(render(strategy, rows))
        if args.repeat > 1:
            print()
            print(render_medians(rows))
        print("\n".join(verdict(rows)))
        print("\n".join(f"- round {r.round}, {d}" for r in rows for d in r.diagnostics))
    print(f"\nwhole benchmark: {time.monotonic() - started:.0f} s; "
          f"command: python benchmarks/batch.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

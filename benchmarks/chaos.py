"""Fault injection: the real daemon against a real multi-process Dask cluster, with faults.

    python benchmarks/chaos.py                      # every scenario, 50 daemon kills (~9 min)
    python benchmarks/chaos.py --quick              # every scenario, short (~3.5 min)
    python benchmarks/chaos.py --scenarios daemon-kill,memory --kills 80

Each scenario starts its own ``dask scheduler`` and ``dask worker`` processes on
127.0.0.1 (workers declare ``--resources MEMORY=<memory limit>``), writes real
Parquet files, queues requests in a spool, runs ``python -m throttler serve`` as a
process, injects its faults, then checks:

* every request ended exactly once: each request file name appears in exactly one
  record's ``requests`` list in ``done/`` or ``failed/`` (``lost``: in none,
  ``duplicates``: in more than one), and nothing is left in ``incoming/`` or ``active/``;
* every ``done/`` output equals an independent pandas group-by over the inputs;
* no stray file in the output directory: no ``.*.tmp``, no output of a group that
  has no ``done/`` record;
* the daemon still serves: a new group submitted at the end is done.

Scenarios (``--scenarios``, comma separated):

``daemon-kill``        SIGKILL the daemon ``--kills`` times at random moments, restart it each time
``worker-kill``        SIGKILL a worker process (the nanny's child) while it executes a group's task
``scheduler-restart``  SIGKILL the scheduler while groups run, restart it on the same port; the
                       workers (which exit with it) come back some seconds after it
``output-unwritable``  the output directory is read-only for the workers for a while, then writable
``output-full``        the output directory is a full tmpfs for a while, then has room
``memory``             a group whose estimate is far too low pushes a worker past its memory limit;
                       then a same-strategy group priced at 80% of a task's budget must still run

Faults that need privileges: ``output-unwritable`` runs the workers as root without
``CAP_DAC_OVERRIDE`` (their capability bounding set drops it, which needs
``CAP_SETPCAP``), so that mode bits bind them as they bind any user; ``output-full``
mounts a tmpfs (needs ``CAP_SYS_ADMIN``) and is reported as not run without it.

A supervisor thread restarts any ``dask worker`` process that exits, as systemd's
``Restart=always`` or Kubernetes would: ``dask worker`` exits (code 0) when it loses its
scheduler, it does not wait for the scheduler to come back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the tests' helpers live in the repository
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers.daemon import (  # noqa: E402
    Daemon,
    NotifyListener,
    Proc,
    free_port,
    leaked_processes,
    make_estate,
    records,
)
from tests.helpers.datafiles import assert_matches_reference  # noqa: E402
from throttler.commands.generate import simulation_dates
from throttler.spool.queue import Spool

SCENARIOS = ("daemon-kill", "worker-kill", "scheduler-restart", "output-unwritable", "output-full", "memory")
RECORD_KINDS = ("done", "failed")
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
PR_CAPBSET_DROP = 24
MEMORY_WORKER_BYTES = 600_000_000  #: memory scenario: each worker's memory limit (and MEMORY)

#: ``python -c`` prologue: drop the capabilities that let root ignore mode bits, then exec argv
DROP_DAC_AND_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in ({CAP_DAC_OVERRIDE}, {CAP_DAC_READ_SEARCH}, {CAP_FOWNER}):
    if libc.prctl({PR_CAPBSET_DROP}, cap, 0, 0, 0) != 0:
        sys.exit("cannot drop capability %d: %s" % (cap, os.strerror(ctypes.get_errno())))
os.execvp(sys.argv[1], sys.argv[1:])
"""


@dataclass(frozen=True)
class Sizes:
    """How hard each scenario pushes; :data:`FULL`, :data:`QUICK`, or the test's own."""

    kills: int = 50  #: daemon SIGKILLs
    worker_kills: int = 10
    scheduler_restarts: int = 3
    scheduler_downtime_seconds: tuple[float, float] = (1.0, 15.0)  #: the daemon's client gives up at 10 s
    workers_back_seconds: tuple[float, float] = (0.0, 20.0)  #: after the scheduler (their restart backoff)
    settle_seconds: tuple[float, float] = (2.0, 5.0)  #: after the workers rejoined, before the next fault
    outage_seconds: float = 30.0  #: output directory unwritable or full for this long
    groups: int = 24  #: groups queued (more are re-queued while faults remain to inject)
    files: tuple[int, int] = (2, 6)  #: files per group, inclusive range
    strategies: tuple[str, ...] = ("auto", "sum")  #: output scenarios: requested strategies, drawn at random
    paths: int = 25_000  #: x dates = rows per file (300,000: a run takes about a second)
    dates: int = 12
    oom_files: int = 16  #: memory scenario: files of the group the estimator under-prices
    oom_paths: int = 30_000  #: x dates rows per file; their union must not fit a worker
    allowed_failures: int | None = None  #: memory scenario: the scheduler's allowed-failures
    timeout_seconds: float = 900.0  #: per scenario, for everything queued to end


FULL = Sizes()
QUICK = Sizes(kills=10, worker_kills=3, scheduler_restarts=1, outage_seconds=10.0, groups=10,
              files=(2, 4), oom_files=16, allowed_failures=1, timeout_seconds=400.0)


@dataclass
class Outcome:
    """One row of the table."""

    scenario: str
    faults: int = 0
    requests: int = 0
    done: int = 0
    failed: int = 0
    lost: int = 0
    duplicates: int = 0
    wrong: int = 0
    stray: int = 0
    serving: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    ran: bool = True

    @property
    def ok(self) -> bool:
        return self.ran and self.serving and not (self.lost or self.duplicates or self.wrong or self.stray)


# ============================================================================ the cluster


def _worker_facts_fn():
    """Runs on each worker (shipped by value): (pid, keys of the tasks executing now)."""
    def facts(dask_worker):
        import os as _os
        return _os.getpid(), [str(ts.key) for ts in dask_worker.state.executing]
    return facts


class Cluster:
    """``dask scheduler`` on a fixed port and supervised ``dask worker`` processes (with nannies)."""

    def __init__(self, log_dir: Path, n_workers: int = 2, nthreads: int = 1,
                 memory_bytes: int = 1_000_000_000, scheduler_env: dict | None = None,
                 drop_dac: bool = False):
        self.log_dir = Path(log_dir)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.n_workers, self.scheduler_env = n_workers, scheduler_env or {}
        prefix = [sys.executable, "-c", DROP_DAC_AND_EXEC] if drop_dac else []
        self.worker_argv = [prefix + ["dask", "worker", self.address, "--nthreads", str(nthreads),
                                      "--memory-limit", str(memory_bytes), "--resources",
                                      f"MEMORY={memory_bytes}", "--no-dashboard", "--name", f"w{i}"]
                            for i in range(n_workers)]
        self.scheduler: Proc | None = None
        self.workers: list[Proc] = []
        self.restarts = 0  #: worker processes the supervisor restarted
        self.hold = threading.Event()  #: set: the supervisor restarts nothing (workers stay away)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = None
        self.start_scheduler()
        self.workers = [Proc(argv, self.log_dir / f"worker{i}.log") for i, argv in enumerate(self.worker_argv)]
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="supervisor")
        self._supervisor.start()

    def start_scheduler(self) -> None:
        self.scheduler = Proc(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                               "--no-dashboard"], self.log_dir / "scheduler.log", self.scheduler_env)

    def kill_scheduler(self) -> None:
        self.drop_client()
        self.scheduler.kill_group()

    def _supervise(self) -> None:
        """Restart any worker process that exited (Restart=always)."""
        while not self._stop.wait(0.2):
            if self.hold.is_set():
                continue
            with self._lock:
                for i, proc in enumerate(self.workers):
                    if proc.popen.poll() is not None and not self._stop.is_set():
                        proc.kill_group()
                        self.workers[i] = Proc(self.worker_argv[i], proc.log_path)
                        self.restarts += 1

    def client(self, timeout_seconds: float = 60.0):
        """The harness's own client (not the daemon's), once every worker has joined."""
        from distributed import Client

        if self._client is None:
            deadline = time.monotonic() + timeout_seconds
            while self._client is None:
                try:
                    self._client = Client(self.address, timeout="2s")
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"scheduler {self.address} unreachable\n{self.logs()}") from None
                    time.sleep(0.2)
        if self.n_workers:
            self._client.wait_for_workers(self.n_workers, timeout=timeout_seconds)
        return self._client

    def drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=2)
            self._client = None

    def worker_facts(self) -> dict[str, tuple[int, list[str]]]:
        """address -> (worker pid, keys executing), for the workers that answer."""
        try:
            return self.client(10).run(_worker_facts_fn(), on_error="ignore")
        except Exception:  # noqa: BLE001 - a worker or the scheduler is away: nothing to report
            return {}

    def nanny_pids(self) -> set[int]:
        with self._lock:
            return {p.pid for p in self.workers}

    def wait_workers(self, timeout_seconds: float = 60.0) -> None:
        self.client(timeout_seconds)

    def logs(self) -> str:
        procs = [self.scheduler, *self.workers]
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in procs if p is not None)

    def log_count(self, text: str) -> int:
        return sum(p.log().count(text) for p in self.workers)

    def close(self) -> None:
        self._stop.set()
        self._supervisor.join(5)
        self.drop_client()
        for proc in [*self.workers, self.scheduler]:
            if proc is not None:
                proc.kill_group()


# ============================================================================ one scenario's world


class Harness:
    """A spool, a data root, an output directory, a cluster and the daemon of one scenario."""

    def __init__(self, workdir: Path, sizes: Sizes, rng: random.Random, **cluster_kw):
        self.dir = Path(workdir)
        self.data, self.out, self.spool_dir, self.logs = (self.dir / n for n in ("data", "out", "spool", "logs"))
        for path in (self.data, self.out, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.spool_dir).ensure()
        self.sizes, self.rng = sizes, rng
        self.estate: dict[str, list[str]] = {}
        self.submitted: list[str] = []
        self.daemon: Daemon | None = None
        self.cluster = Cluster(self.logs, **cluster_kw)

    # -- data and requests

    def make_groups(self, count: int, prefix: str = "g") -> list[str]:
        low, high = self.sizes.files
        sizes = {f"{prefix}{len(self.estate) + i:03d}": self.rng.randint(low, high) for i in range(count)}
        self.estate.update(make_estate(self.data, sizes, n_paths=self.sizes.paths, n_dates=self.sizes.dates))
        return list(sizes)

    def submit(self, group: str, strategy: str = "auto") -> str:
        """Queue a full run: a group asked again with no file changed would otherwise be an
        ``unchanged`` run that reads and writes nothing, and the faults need work in flight."""
        name = self.spool.submit(group, strategy=strategy, full=True).name
        self.submitted.append(name)
        return name

    def closed(self) -> Counter:
        return Counter(n for kind in RECORD_KINDS for r in records(self.spool_dir, kind) for n in r["requests"])

    def pending(self) -> int:
        closed = self.closed()
        return sum(1 for name in self.submitted if not closed[name])

    def wait_all_closed(self, timeout_seconds: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout_seconds or self.sizes.timeout_seconds)
        while time.monotonic() < deadline:
            if not self.pending():
                return True
            if self.daemon is not None and self.daemon.proc.popen.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    # -- the daemon

    def start_daemon(self, *extra: str, env: dict | None = None) -> Daemon:
        args = ["--spool", str(self.spool_dir), "--data-root", str(self.data), "--output", str(self.out),
                "--scheduler", self.cluster.address, "--metrics-address", "", "--poll-seconds", "0.05",
                "--rescan-seconds", "0.5", *extra]
        self.daemon = Daemon(args, self.logs / "daemon.log", env)
        return self.daemon

    def kill_daemon(self) -> None:
        self.daemon.kill()  # SIGKILL to its process group
        self.daemon = None

    def still_serving(self, timeout_seconds: float = 120.0) -> bool:
        """Submit one new group to the running daemon and see it done."""
        (group,) = self.make_groups(1, prefix="probe")
        name = self.submit(group)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            for record in records(self.spool_dir, "done"):
                if name in record["requests"]:
                    return True
            time.sleep(0.2)
        return False

    def stop_daemon(self) -> int | None:
        """SIGTERM (drain); the exit code, or None if it had to be killed."""
        if self.daemon is None:
            return None
        try:
            code, _ = self.daemon.stop(60)
        except AssertionError:
            code = None
        self.kill_daemon()
        return code

    def close(self) -> None:
        if self.daemon is not None:
            self.kill_daemon()
        self.cluster.close()


# ============================================================================ the checks


def verify(h: Harness, outcome: Outcome) -> Outcome:
    """Fill the outcome's counts from the spool and the output directory."""
    recs = {kind: records(h.spool_dir, kind) for kind in RECORD_KINDS}
    closed = Counter(n for kind in RECORD_KINDS for r in recs[kind] for n in r["requests"])
    by_kind = {kind: {n for r in recs[kind] for n in r["requests"]} for kind in RECORD_KINDS}
    left = sorted(os.listdir(h.spool_dir / "incoming")) + [
        f"{run}/{f}" for run in os.listdir(h.spool_dir / "active") for f in os.listdir(h.spool_dir / "active" / run)]
    outcome.requests = len(h.submitted)
    outcome.done = sum(1 for n in h.submitted if n in by_kind["done"])
    outcome.failed = sum(1 for n in h.submitted if n in by_kind["failed"] and n not in by_kind["done"])
    outcome.lost = sum(1 for n in h.submitted if not closed[n])
    outcome.duplicates = sum(c - 1 for c in closed.values() if c > 1)
    unknown = [n for n in closed if n not in set(h.submitted)]
    if unknown:
        outcome.notes.append(f"records close requests never submitted: {unknown[:5]}")
    if left:
        outcome.notes.append(f"left in incoming/ or active/: {left[:5]}")
    done_groups = {r["group"] for r in recs["done"]}
    outcome.wrong = sum(1 for g in sorted(done_groups) if not _output_matches(h, g, outcome.notes))
    outcome.stray = len(_stray_outputs(h.out, done_groups, outcome.notes))
    return outcome


def _output_matches(h: Harness, group: str, notes: list[str]) -> bool:
    try:
        assert_matches_reference(h.out / f"{group}.parquet", h.estate[group])
    except (AssertionError, OSError, KeyError) as exc:
        notes.append(f"wrong output for {group}: {type(exc).__name__}: {str(exc)[:200]}")
        return False
    return True


def _stray_outputs(out: Path, done_groups: set[str], notes: list[str]) -> list[str]:
    expected = {f"{g}.parquet" for g in done_groups}
    stray = sorted(n for n in os.listdir(out) if n not in expected and n != "filler")
    if stray:
        notes.append(f"stray files in the output directory: {stray[:5]}")
    return stray


def finish(h: Harness, outcome: Outcome, started: float) -> Outcome:
    """Wait for the queue to drain, probe the daemon, stop it, check everything."""
    if not h.wait_all_closed():
        outcome.notes.append(f"{h.pending()} request(s) still open after {h.sizes.timeout_seconds:.0f} s")
    outcome.serving = h.still_serving()
    code = h.stop_daemon()
    if code != 0:
        outcome.notes.append(f"daemon exit code after SIGTERM: {code}")
    verify(h, outcome)
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def history_counts(h: Harness) -> Counter:
    """Failed attempts by exception name, over every record's history."""
    counts: Counter = Counter()
    for kind in RECORD_KINDS:
        for record in records(h.spool_dir, kind):
            for line in record.get("history", []):
                counts[line.split(": ", 1)[-1].split(":", 1)[0]] += 1
    return counts


def attempts_above_one(h: Harness) -> int:
    return sum(1 for r in records(h.spool_dir, "done") if r.get("attempts", 1) > 1)


# ============================================================================ scenarios


def run_daemon_kill(h: Harness, outcome: Outcome) -> None:
    """SIGKILL the daemon at random moments, restart it, while requests keep arriving."""
    groups = h.make_groups(h.sizes.groups)
    for g in groups[: len(groups) // 2]:
        h.submit(g, h.rng.choice(("auto", "auto", "sum")))
    trickle = groups[len(groups) // 2:]
    h.cluster.wait_workers()
    phases: Counter = Counter()
    for _ in range(h.sizes.kills):
        daemon = h.start_daemon()
        if h.rng.random() < 0.2:  # startup: imports, spool recovery, connecting
            _sleep_and_trickle(h, h.rng.uniform(0.0, 2.5), trickle, groups)
        else:
            with contextlib.suppress(AssertionError):
                daemon.wait_ready(60)
            _sleep_and_trickle(h, h.rng.uniform(0.0, 1.5), trickle, groups)
        phases.update(_phase_at_kill(h, daemon))
        h.kill_daemon()
        outcome.faults += 1
    outcome.details["moments"] = dict(phases)
    outcome.notes.append("kills landed: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())))
    h.start_daemon()


def _sleep_and_trickle(h: Harness, seconds: float, trickle: list[str], groups: list[str]) -> None:
    """Sleep ``seconds``; at a random point in between, queue more work if the queue runs low."""
    split = h.rng.uniform(0.0, seconds)
    time.sleep(split)
    if h.pending() < 6:
        if trickle:
            h.submit(trickle.pop(0))
        else:  # everything queued once: ask again (a re-run rewrites the same output)
            h.submit(h.rng.choice(groups), h.rng.choice(("auto", "sum")))
        if h.rng.random() < 0.3:  # a duplicate, coalesced into the run or run again
            h.submit(h.rng.choice(groups))
    time.sleep(seconds - split)


def _phase_at_kill(h: Harness, daemon: Daemon) -> list[str]:
    """What the daemon was doing when killed, from its log and the spool (several may hold)."""
    log = daemon.log()
    if "serving spool" not in log:
        return ["during startup"]
    phases = []
    submitted = log.count("throttler.service.service: submitted ")
    ended = log.count("throttler.service.service: done ") + log.count("throttler.service.service: failed ")
    running = submitted - ended - log.count("; retrying in ")
    active = len(os.listdir(h.spool_dir / "active"))
    if running > 0:
        phases.append("with groups running")
    if active > max(0, running):
        phases.append("with claims not yet submitted")
    newest = max((p.stat().st_mtime for kind in RECORD_KINDS for p in (h.spool_dir / kind).glob("*.json")),
                 default=0.0)
    if time.time() - newest < 0.2:
        phases.append("within 200 ms of a record write")
    return phases or ["idle"]


def run_worker_kill(h: Harness, outcome: Outcome) -> None:
    """SIGKILL a worker process (not its nanny) while it executes one of the daemon's tasks;
    every other kill waits for a task writing its output (a ``.tmp`` file open in the output
    directory), to see what a death in the middle of the write leaves behind."""
    groups = h.make_groups(h.sizes.groups)
    for g in groups:
        h.submit(g, "sum")  # sum tasks last long enough to be caught executing
    h.cluster.wait_workers()
    h.start_daemon().wait_ready()
    moments: Counter = Counter()
    deadline = time.monotonic() + h.sizes.timeout_seconds
    refilled = 0.0
    while outcome.faults < h.sizes.worker_kills and time.monotonic() < deadline:
        if time.monotonic() - refilled > 0.5:  # keep work queued (reading records costs: not every poll)
            refilled = time.monotonic()
            if h.pending() < 3:
                h.submit(h.rng.choice(groups), "sum")
        writing = outcome.faults % 2 == 1
        victim = _worker_writing_output(h) if writing else _worker_running_a_group(h)
        if victim is None:
            time.sleep(0.002 if writing else 0.05)
            continue
        pid, what = victim
        if not writing:
            time.sleep(h.rng.uniform(0.0, 0.3))  # somewhere inside the task
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            outcome.faults += 1
            moments[what] += 1
        _wait_for_pid_gone_and_workers(h, pid)
    outcome.details["moments"] = dict(moments)
    outcome.details["memory_blamed"] = _daemon_log(h).count("its task killed worker")  # an operator's kill: 0
    outcome.notes.append("worker killed while running: " + ", ".join(f"{k} {v}" for k, v in sorted(moments.items()))
                         + f"; memory kills blamed on a group: {outcome.details['memory_blamed']}")


def _worker_writing_output(h: Harness) -> tuple[int, str] | None:
    """(pid, "output write") of a worker process holding a temporary output file open."""
    for pid in _worker_pids(h):
        with contextlib.suppress(psutil.Error):
            for f in psutil.Process(pid).open_files():
                if f.path.startswith(str(h.out)) and f.path.endswith(".tmp"):
                    return pid, "output write (.tmp open)"
    return None


def _worker_pids(h: Harness) -> list[int]:
    """The worker processes: children of the nannies (the other child is multiprocessing's tracker)."""
    pids = []
    for nanny in h.cluster.nanny_pids():
        with contextlib.suppress(psutil.Error):
            pids += [c.pid for c in psutil.Process(nanny).children()
                     if "resource_tracker" not in " ".join(c.cmdline())]
    return pids


def _worker_running_a_group(h: Harness) -> tuple[int, str] | None:
    nannies = h.cluster.nanny_pids()
    for pid, keys in h.cluster.worker_facts().values():
        ours = [k for k in keys if k.startswith("throttler-")]
        with contextlib.suppress(psutil.Error):
            if ours and psutil.Process(pid).ppid() in nannies:
                return pid, f"{ours[0].split('-')[3]} task"
    return None


def _wait_for_pid_gone_and_workers(h: Harness, pid: int, timeout_seconds: float = 60.0) -> None:
    _wait_until(lambda: _gone(pid), timeout_seconds)
    with contextlib.suppress(Exception):
        h.cluster.wait_workers(timeout_seconds)  # the nanny has started its replacement


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_scheduler_restart(h: Harness, outcome: Outcome) -> None:
    """SIGKILL the scheduler while groups run; restart it on the same port after a pause.

    The daemon runs with a systemd watchdog of 2 s (pings every second), so the longest
    gap between pings shows how long its main loop stalled meanwhile.
    """
    groups = h.make_groups(h.sizes.groups)
    for g in groups:
        h.submit(g, h.rng.choice(("auto", "sum")))
    h.cluster.wait_workers()
    listener = NotifyListener(Path(tempfile.mkdtemp(prefix="chaos-notify-")) / "notify")
    try:
        daemon = h.start_daemon(env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000",
                                     "WATCHDOG_PID": None})
        daemon.wait_ready()
        downtimes = [_restart_scheduler_once(h, groups, outcome) for _ in range(h.sizes.scheduler_restarts)]
        pings = listener.times_of("WATCHDOG=1")
    finally:
        listener.close()
        shutil.rmtree(Path(listener.path).parent, ignore_errors=True)
    stall = max((b - a for a, b in zip(pings, pings[1:])), default=0.0)
    outcome.details.update(downtimes_seconds=downtimes, longest_watchdog_gap_seconds=round(stall, 1),
                           client_replaced=daemon.log().count("reconnected to the scheduler"))
    outcome.notes.append(f"(scheduler down, workers back after it) {downtimes} s; worker processes restarted: "
                         f"{h.cluster.restarts}; client replaced by the daemon: "
                         f"{daemon.log().count('reconnected to the scheduler')} time(s); longest gap between "
                         f"watchdog pings (main-loop stall): {stall:.1f} s")


def _restart_scheduler_once(h: Harness, groups: list[str], outcome: Outcome) -> tuple[float, float]:
    if h.pending() < 4:
        for g in h.rng.sample(groups, min(4, len(groups))):
            h.submit(g, "sum")
    _wait_until(lambda: _worker_running_a_group(h) is not None, 60)
    h.cluster.hold.set()  # the workers exit with their scheduler; they come back after it
    h.cluster.kill_scheduler()
    outcome.faults += 1
    downtime = round(h.rng.uniform(*h.sizes.scheduler_downtime_seconds), 1)
    time.sleep(downtime)
    h.cluster.start_scheduler()
    for g in h.make_groups(2, prefix="late"):  # new groups keep arriving meanwhile
        h.submit(g)
    workers_back = round(h.rng.uniform(*h.sizes.workers_back_seconds), 1)
    time.sleep(workers_back)
    h.cluster.hold.clear()
    h.cluster.wait_workers(120)
    time.sleep(h.rng.uniform(*h.sizes.settle_seconds))
    return downtime, workers_back


def run_output_fault(h: Harness, outcome: Outcome, mode: str) -> None:
    """Make the output directory unwritable (``mode="unwritable"``) or full for a while."""
    groups = h.make_groups(h.sizes.groups)
    h.cluster.wait_workers()
    if mode == "unwritable" and not _mode_bits_bind_workers(h):
        outcome.ran = False
        outcome.notes.append("not run: workers without CAP_DAC_OVERRIDE could still write a 0o500 directory")
        return
    daemon = h.start_daemon()
    daemon.wait_ready()
    h.submit(groups[0])
    _wait_until(lambda: h.pending() == 0, 120)  # one group done before the fault
    with _output_fault(h, mode):
        outcome.faults += 1
        for g in groups[1:]:
            h.submit(g, h.rng.choice(h.sizes.strategies))
        time.sleep(h.sizes.outage_seconds)
        open_during = h.pending()
    outcome.notes.append(f"outage {h.sizes.outage_seconds:.0f} s: {open_during} request(s) open at its end")


@contextlib.contextmanager
def _output_fault(h: Harness, mode: str):
    if mode == "unwritable":
        os.chmod(h.out, 0o500)
        try:
            yield
        finally:
            os.chmod(h.out, 0o750)
        return
    filler = h.out / "filler"
    _fill(filler)
    try:
        yield
    finally:
        filler.unlink()


def _fill(path: Path) -> int:
    """Write ``path`` until its file system is full (to the last byte); returns bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written, chunk = 0, 1 << 20
    try:
        while chunk:
            try:
                written += os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return written


def _mode_bits_bind_workers(h: Harness) -> bool:
    """True when a process started the way the workers are cannot write a 0o500 directory."""
    probe = h.dir / "probe-ro"
    probe.mkdir(mode=0o500)
    try:
        result = subprocess.run([sys.executable, "-c", DROP_DAC_AND_EXEC, sys.executable, "-c",
                                 f"open({str(probe / 'x')!r}, 'w')"], capture_output=True, timeout=30)
        return result.returncode != 0 and b"PermissionError" in result.stderr
    finally:
        os.chmod(probe, 0o700)
        shutil.rmtree(probe)


def can_mount_tmpfs() -> bool:
    """True if this process may mount a tmpfs (CAP_SYS_ADMIN)."""
    target = tempfile.mkdtemp(prefix="chaos-mount-")
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", target],
                          capture_output=True).returncode != 0:
            return False
        subprocess.run(["umount", target], check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False
    finally:
        os.rmdir(target)


def write_disjoint_group(root: Path, group: str, n_files: int, n_paths: int, n_dates: int) -> list[str]:
    """Files whose keys do not overlap (each covers its own range of paths), with row counts
    that differ a little: the data contract allows it (the output is the union of keys), but
    the estimator prices a partial result at one file's rows, so it under-prices the group
    about ``n_files`` times."""
    directory = root / group
    directory.mkdir(parents=True, exist_ok=True)
    dates = simulation_dates(n_dates, 0)
    paths, first = [], 0
    for i in range(n_files):
        count = n_paths + i
        rng = np.random.default_rng(1000 + i)
        keys = np.repeat(np.arange(first, first + count, dtype=np.int64), n_dates)
        table = pa.table({"path": keys, "Date": pa.array(np.tile(dates, count), pa.date32()),
                          "value": rng.standard_normal(len(keys))})
        pq.write_table(table, directory / f"f{i:03d}.parquet")
        paths.append(str(directory / f"f{i:03d}.parquet"))
        first += count
    return paths


def run_memory(h: Harness, outcome: Outcome) -> None:
    """A group the estimator under-prices pushes a worker past its memory limit; once it has
    ended, a same-strategy group that fits a worker with room to spare is queued ("near")."""
    outcome.details["corrections_before"] = _corrections(h)
    others = h.make_groups(h.sizes.groups)
    h.estate["oom"] = write_disjoint_group(h.data, "oom", h.sizes.oom_files, h.sizes.oom_paths, h.sizes.dates)
    paths = near_budget_paths(MEMORY_WORKER_BYTES, h.sizes.dates)
    h.estate.update(make_estate(h.data, {"near": 2}, n_paths=paths, n_dates=h.sizes.dates))
    h.cluster.wait_workers()
    h.start_daemon().wait_ready()
    for g in others[: len(others) // 2]:
        h.submit(g)
    # sum: its model prices a partial at one file's rows, so it under-prices this group;
    # auto would pick dense, whose grid (from the footers) sees the union and refuses it
    outcome.details["oom_request"] = h.submit("oom", "sum")
    for g in others[len(others) // 2:]:
        h.submit(g, h.rng.choice(("auto", "sum")))
    _wait_until(lambda: h.closed()[outcome.details["oom_request"]] > 0, h.sizes.timeout_seconds)
    outcome.details["near_request"] = h.submit("near", "sum")


def near_budget_paths(memory_bytes: int, n_dates: int, share: float = 0.8) -> int:
    """Paths per file of a shared-key ``sum`` group whose largest task the planner prices
    at about ``share`` of a worker's task budget, with the estimator untrained."""
    from throttler.cluster.snapshot import ClusterShape
    from throttler.errors import DoesNotFit
    from throttler.planning.estimator import Estimator
    from throttler.planning.plan import FileInfo
    from throttler.planning.planner import DEFAULT_MEMORY_FRACTION, make_plan

    shape = ClusterShape.uniform(2, memory_bytes, 1)
    target = share * shape.task_budget_bytes(DEFAULT_MEMORY_FRACTION)

    def peak(paths: int) -> float:
        rows = paths * n_dates
        files = [FileInfo(f"f{i}", rows * 9, rows, rows * 10) for i in range(2)]
        try:
            return make_plan("near", files, "sum", shape, Estimator()).task_peak_bytes
        except DoesNotFit:
            return math.inf

    low, high = 1, 10_000_000
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if peak(mid) <= target else (low, mid - 1)
    return low


def after_memory(h: Harness, outcome: Outcome) -> None:
    """Once everything ended: what became of the under-priced group, the others, the estimator."""
    outcome.faults = h.cluster.log_count("exceeded 95% memory budget")
    request = outcome.details["oom_request"]
    oom = next((r for kind in RECORD_KINDS for r in records(h.spool_dir, kind) if request in r["requests"]), {})
    others = [r for kind in RECORD_KINDS for r in records(h.spool_dir, kind) if r.get("group") not in ("oom", "near")]
    near = next((r for kind in RECORD_KINDS for r in records(h.spool_dir, kind)
                 if outcome.details["near_request"] in r["requests"]), {})
    before, after = outcome.details["corrections_before"], _corrections(h)
    outcome.details.update(
        oom_record={k: oom.get(k) for k in ("attempts", "reason", "history", "estimate_bytes", "strategy")},
        near_record={k: near.get(k) for k in ("output", "attempts", "reason", "task_estimate_bytes")},
        corrections_after=after,
        memory_blamed=_daemon_log(h).count("oom: its task killed worker"),
        other_groups={"done": sum(1 for r in others if "output" in r),
                      "failed": sum(1 for r in others if "output" not in r),
                      "max_attempts": max((r.get("attempts", 1) for r in others), default=0)})
    ended = "done" if "output" in oom else "failed"
    outcome.notes.append(
        f"under-priced group {ended} after {oom.get('attempts')} attempt(s)"
        + (f" ({oom.get('reason', '')[:160]})" if ended == "failed" else "")
        + f"; sum correction {before.get('sum', 1.0):.2f} -> {after.get('sum', 1.0):.2f}; "
        f"other groups: {outcome.details['other_groups']}; the group queued after it, sized to 80% of a "
        f"task's budget: " + ("done" if "output" in near else f"failed ({near.get('reason', 'no record')[:220]})"))


def _daemon_log(h: Harness) -> str:
    path = h.logs / "daemon.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _corrections(h: Harness) -> dict[str, float]:
    try:
        state = json.loads((h.spool_dir / "state" / "estimator.json").read_text())
    except FileNotFoundError:
        return {}
    return {k: round(v["correction"], 3) for k, v in state.get("strategies", {}).items()}


def _wait_until(predicate, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ============================================================================ driver


def _cluster_options(name: str, sizes: Sizes) -> dict:
    if name == "memory":
        env = {} if sizes.allowed_failures is None else {
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(sizes.allowed_failures)}
        return dict(n_workers=2, nthreads=1, memory_bytes=MEMORY_WORKER_BYTES, scheduler_env=env)
    return dict(n_workers=2, nthreads=1, memory_bytes=1_000_000_000, drop_dac=name == "output-unwritable")


def run_scenario(name: str, sizes: Sizes, workdir: Path, seed: int = 0) -> Outcome:
    """Run one scenario in ``workdir`` (its own cluster and daemon); every process is gone after."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {SCENARIOS}")
    outcome = Outcome(name)
    if name == "output-full" and not can_mount_tmpfs():
        outcome.ran = False
        outcome.notes.append("not run: mounting a tmpfs needs CAP_SYS_ADMIN")
        return outcome
    started = time.monotonic()
    workdir = Path(workdir) / name
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh spool, data and output every run
    mounted = _mount_output(workdir) if name == "output-full" else False
    h = Harness(workdir, sizes, random.Random(seed), **_cluster_options(name, sizes))
    try:
        _SCENARIO_FUNCTIONS[name](h, outcome)
        if outcome.ran:
            finish(h, outcome, started)
            if name == "memory":
                after_memory(h, outcome)
            outcome.details["failed_attempts"] = dict(history_counts(h))
            outcome.notes.append(f"failed attempts by error (from the records' history): "
                                 f"{dict(history_counts(h)) or 'none'}; groups done after more than one "
                                 f"attempt: {attempts_above_one(h)}")
    finally:
        h.close()
        if mounted:
            subprocess.run(["umount", str(workdir / "out")], check=False)
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _mount_output(workdir: Path, size: str = "256m") -> bool:
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(out)], check=True)
    return True


_SCENARIO_FUNCTIONS = {
    "daemon-kill": run_daemon_kill,
    "worker-kill": run_worker_kill,
    "scheduler-restart": run_scheduler_restart,
    "output-unwritable": lambda h, o: run_output_fault(h, o, "unwritable"),
    "output-full": lambda h, o: run_output_fault(h, o, "full"),
    "memory": run_memory,
}

COLUMNS = ("scenario", "faults injected", "requests", "done", "failed", "lost", "duplicates",
           "wrong outputs", "stray files", "still serving", "seconds")


def table(outcomes: list[Outcome]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for o in outcomes:
        if not o.ran:
            rows.append(f"| {o.scenario} | not run | | | | | | | | | |")
            continue
        cells = (o.scenario, o.faults, o.requests, o.done, o.failed, o.lost, o.duplicates, o.wrong, o.stray,
                 "yes" if o.serving else "NO", f"{o.seconds:.0f}")
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, default: all")
    parser.add_argument("--kills", type=int, default=None, help="daemon SIGKILLs (default 50; --quick: 10)")
    parser.add_argument("--quick", action="store_true", help="fewer faults and groups (a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep data, spools and logs here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the outcomes as JSON")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.kills is not None:
        sizes = replace(sizes, kills=args.kills)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="throttler-chaos-"))
    outcomes = []
    started = time.monotonic()
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        outcome = run_scenario(name, sizes, workdir, args.seed)
        outcomes.append(outcome)
        print(f"   {'ok' if outcome.ok else 'FAILED' if outcome.ran else 'not run'} in {outcome.seconds:.0f} s; "
              + "; ".join(outcome.notes), file=sys.stderr, flush=True)
    print(table(outcomes))
    print()
    for o in outcomes:
        for note in o.notes:
            print(f"- {o.scenario}: {note}")
    print(f"\ntotal {time.monotonic() - started:.0f} s; work directory {workdir}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=1, default=str))
    leaked = leaked_processes()
    if leaked:
        print(f"processes left behind: {leaked}", file=sys.stderr)
    ok = all(o.ok or not o.ran for o in outcomes) and not leaked
    if ok and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)  # kept when something failed, for its logs
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

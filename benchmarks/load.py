"""Load and soak of the real daemon: a flood of small requests, then a steady stream with reloads.

    python benchmarks/load.py                                   # 10,000 requests, then a 180 s soak at 20/s
    python benchmarks/load.py --requests 10000 --soak-seconds 120
    python benchmarks/load.py --requests 500 --soak-seconds 20 --rate 10      # smoke run (~1 min)

Setup. ``--requests`` distinct groups of ``--files-per-group`` small files (300
rows each), every file a hard link to one of a few physical files, so each
request is a real run of a real group. ``throttler serve`` runs as a child
process against a ``dask scheduler`` and ``--workers`` ``dask worker``
processes started here (1 thread, 1 GB, declaring MEMORY), so the daemon's
RSS is its own, without an embedded scheduler's. ``--cluster embedded`` runs
the daemon's own local cluster instead.

Load: every request is written to ``tmp/`` and renamed into ``incoming/`` at
once (plain-name requests), while the daemon runs. The run ends when every
request file is closed by a record. Reported: requests/s (requests over the
time from the first drop to the last record), the per-group time from claim
to submit at p50/p99 (``claim_to_submit_seconds`` from the record when the
daemon writes it, else ``total_seconds - seconds``: claim to record, less the
run), the admission wait inside it, and the daemon's RSS after start, at its
highest and at the end.

Soak: ``--rate`` JSON requests a second for ``--soak-seconds``, for groups
cycling over the same estate, with a SIGHUP every ``--reload-seconds`` (each
reload changes ``max_head_wait_seconds`` in the config file, so it really
reloads). At the end every request must be closed by exactly one record:
lost and duplicated requests are counted and the script exits 1 if any.

Nothing else runs meanwhile; the machine's load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.datafiles import write_sim  # noqa: E402 - the repository's own small-file writer

PHYSICAL_FILES = 4  #: distinct files behind every hard link
WORKER_MEMORY_BYTES = 1_000_000_000
CHILD_ENV = {"DASK_LOGGING__DISTRIBUTED": "warning", "PYTHONUNBUFFERED": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="requests of the load phase (distinct groups)")
    p.add_argument("--soak-seconds", type=float, default=180.0, help="length of the soak (0: no soak)")
    p.add_argument("--rate", type=float, default=20.0, help="soak requests per second")
    p.add_argument("--reload-seconds", type=float, default=20.0, help="SIGHUP period during the soak")
    p.add_argument("--files-per-group", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (1 thread, 1 GB each)")
    p.add_argument("--cluster", choices=("external", "embedded"), default="external")
    p.add_argument("--timeout-seconds", type=float, default=3600.0, help="give up waiting for records after this")
    p.add_argument("--work-dir", help="directory for the estate, spool and outputs (default: a temp dir, removed)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- estate


def build_estate(data: Path, n_groups: int, files_per_group: int) -> list[str]:
    """``n_groups`` group directories of hard links to a few physical files; returns the group IDs."""
    pool = data / "_pool"  # a leading underscore is a valid directory, never requested
    pool.mkdir(parents=True)
    physical = [write_sim(pool / f"p{i}.parquet", seed=i) for i in range(PHYSICAL_FILES)]
    groups = [f"g{i:05d}" for i in range(n_groups)]
    for i, group in enumerate(groups):
        (data / group).mkdir()
        for j in range(files_per_group):
            os.link(physical[(i + j) % PHYSICAL_FILES], data / group / f"f{j:03d}.parquet")
    return groups


def drop(spool: Path, name: str, content: bytes = b"") -> None:
    """A request as another program writes it: tmp/, then a rename into incoming/."""
    tmp = spool / "tmp" / f"{name}.drop"
    tmp.write_bytes(content)
    os.rename(tmp, spool / "incoming" / name)


# --------------------------------------------------------------------------- processes


class Child:
    """A process started here, in its own session, output to a log file."""

    def __init__(self, argv: list[str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **CHILD_ENV}, start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_seconds: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while text not in self.log():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.log_path.name}: no {text!r}\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self, timeout_seconds: float = 60.0) -> None:
        """SIGTERM, then SIGKILL of this child's process group if it does not exit."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # our own session: only what this child started
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(work: Path, n_workers: int) -> tuple[str, list[Child]]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    children = [Child(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                      work / "scheduler.log")]
    for i in range(n_workers):
        children.append(Child(["dask", "worker", address, "--nthreads", "1", "--memory-limit",
                               str(WORKER_MEMORY_BYTES), "--resources", f"MEMORY={WORKER_MEMORY_BYTES}",
                               "--no-dashboard", "--name", f"w{i}"], work / f"worker{i}.log"))
    from distributed import Client

    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(address, timeout="2s") as client:
                client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
            return address, children
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_daemon(work: Path, scheduler: str | None, n_workers: int) -> Child:
    config = work / "throttler.toml"
    write_config(config, 60.0)
    argv = [sys.executable, "-m", "throttler", "serve", "--config", str(config), "--spool", str(work / "spool"),
            "--data-root", str(work / "data"), "--output", str(work / "out"), "--metrics-address", "127.0.0.1:0"]
    argv += ["--scheduler", scheduler] if scheduler else ["--workers", str(n_workers), "--threads-per-worker", "1",
                                                          "--worker-memory-bytes", str(WORKER_MEMORY_BYTES)]
    daemon = Child(argv, work / "daemon.log")
    daemon.wait_for_log("serving spool")
    return daemon


def write_config(path: Path, max_head_wait_seconds: float) -> None:
    path.write_text(f"[throttler]\nmax_head_wait_seconds = {max_head_wait_seconds}\n")


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# --------------------------------------------------------------------------- records


class Records:
    """Every record in done/ and failed/, read once each as they appear."""

    def __init__(self, spool: Path):
        self.spool = spool
        self.seen: set[str] = set()
        self.closed: dict[str, int] = {}  #: request name -> records closing it
        self.done: list[dict] = []
        self.failed: list[dict] = []

    def poll(self) -> int:
        """Read new records; returns how many request files are closed so far."""
        for kind, bucket in (("done", self.done), ("failed", self.failed)):
            with os.scandir(self.spool / kind) as entries:
                new = [e.name for e in entries if e.name not in self.seen]
            for name in new:
                record = json.loads((self.spool / kind / name).read_text())
                self.seen.add(name)
                bucket.append(record)
                for request in record["requests"]:
                    self.closed[request] = self.closed.get(request, 0) + 1
        return len(self.closed)

    def wait_closed(self, names: set[str], timeout_seconds: float, on_tick=None) -> float:
        """Until every name is closed; returns the monotonic time it happened."""
        deadline = time.monotonic() + timeout_seconds
        while not names <= self.closed.keys():
            if time.monotonic() > deadline:
                missing = len(names - self.closed.keys())
                raise RuntimeError(f"{missing} of {len(names)} requests not closed after {timeout_seconds:.0f} s")
            if on_tick is not None:
                on_tick()
            time.sleep(0.2)
            self.poll()
        return time.monotonic()


def claim_to_submit_seconds(record: dict) -> float:
    if "claim_to_submit_seconds" in record:
        return record["claim_to_submit_seconds"]
    return record["total_seconds"] - record["seconds"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- phases


def load_phase(work: Path, daemon: Child, groups: list[str], timeout_seconds: float) -> dict:
    spool, records = work / "spool", Records(work / "spool")
    rss_start = rss_bytes(daemon.pid)
    peak = [rss_start]
    started = time.monotonic()
    for group in groups:
        drop(spool, group)
    dropped = time.monotonic()
    finished = records.wait_closed(set(groups), timeout_seconds,
                                   on_tick=lambda: peak.append(rss_bytes(daemon.pid)))
    done = [r for r in records.done if r["group"] in set(groups)]
    overhead = [claim_to_submit_seconds(r) for r in done]
    waits = [r["admission_wait_seconds"] for r in done]
    own = [o - w for o, w in zip(overhead, waits)]
    return {
        "requests": len(groups), "done": len(done), "failed": len(records.failed),
        "drop_seconds": dropped - started, "seconds": finished - started,
        "requests_per_second": len(groups) / (finished - started),
        "claim_to_submit_p50_seconds": percentile(overhead, 50),
        "claim_to_submit_p99_seconds": percentile(overhead, 99),
        "claim_to_submit_source": "record field" if all("claim_to_submit_seconds" in r for r in done)
        else "total_seconds - seconds",
        "admission_wait_p50_seconds": percentile(waits, 50), "admission_wait_p99_seconds": percentile(waits, 99),
        "own_p50_seconds": percentile(own, 50), "own_p99_seconds": percentile(own, 99),
        "run_p50_seconds": percentile([r["seconds"] for r in done], 50),
        "rss_start_bytes": rss_start, "rss_peak_bytes": max(peak), "rss_end_bytes": rss_bytes(daemon.pid),
        "duplicates": sum(1 for n in groups if records.closed.get(n, 0) > 1),
    }


def soak_phase(work: Path, daemon: Child, groups: list[str], args) -> dict:
    spool, records = work / "spool", Records(work / "spool")
    records.poll()  # the load phase's records
    before = dict(records.closed)
    rss_start, peak = rss_bytes(daemon.pid), []
    names, sent_at = [], {}
    started = time.monotonic()
    next_reload, reloads = started + args.reload_seconds, 0
    i = 0
    while time.monotonic() - started < args.soak_seconds:
        due = int((time.monotonic() - started) * args.rate)
        while i < due:
            name = f"soak-{i:06d}.json"
            # full: a group asked again with nothing new would be an ``unchanged`` run (no work)
            drop(spool, name, json.dumps({"group": groups[i % len(groups)], "full": True}).encode())
            names.append(name)
            sent_at[name] = time.time()
            i += 1
        if time.monotonic() >= next_reload:
            reloads += 1
            write_config(work / "throttler.toml", 60.0 + reloads)
            daemon.popen.send_signal(signal.SIGHUP)
            next_reload += args.reload_seconds
        records.poll()
        peak.append(rss_bytes(daemon.pid))
        time.sleep(0.05)
    sending = time.monotonic() - started
    records.wait_closed(set(names), args.timeout_seconds)
    finished = {req: r for r in records.done + records.failed for req in r["requests"] if req in sent_at}
    latency = [finished[n]["finished_unix_seconds"] - sent_at[n] for n in names]
    return {
        "requests": len(names), "seconds_sending": sending, "rate_per_second": len(names) / sending,
        "reloads_sent": reloads, "reloads_logged": daemon.log().count("configuration reloaded"),
        "closed": sum(1 for n in names if records.closed.get(n, 0) >= 1),
        "lost": sum(1 for n in names if n not in records.closed),
        "duplicates": sum(1 for n in names if records.closed.get(n, 0) > 1)
        + sum(1 for n, k in before.items() if records.closed.get(n) != k),
        "failed": sum(1 for n in names if finished[n] in records.failed),
        "latency_p50_seconds": percentile(latency, 50), "latency_p99_seconds": percentile(latency, 99),
        "rss_start_bytes": rss_start, "rss_peak_bytes": max(peak or [rss_start]),
        "rss_end_bytes": rss_bytes(daemon.pid),
    }


# --------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(load: dict, soak: dict | None, args) -> str:
    rows = [
        ("load: requests (distinct groups)", f"{load['requests']:,} ({load['done']:,} done, {load['failed']} failed)"),
        ("load: dropping them into incoming/", f"{load['drop_seconds']:.2f} s"),
        ("load: first drop to last record", f"{load['seconds']:.1f} s"),
        ("load: requests/s", f"{load['requests_per_second']:.1f}"),
        ("load: claim to submit p50 / p99", f"{1e3 * load['claim_to_submit_p50_seconds']:.1f} / "
                                            f"{1e3 * load['claim_to_submit_p99_seconds']:.1f} ms "
                                            f"({load['claim_to_submit_source']})"),
        ("load: of which admission wait p50 / p99", f"{1e3 * load['admission_wait_p50_seconds']:.1f} / "
                                                    f"{1e3 * load['admission_wait_p99_seconds']:.1f} ms"),
        ("load: the rest (plan, graph, hand-off) p50 / p99", f"{1e3 * load['own_p50_seconds']:.1f} / "
                                                             f"{1e3 * load['own_p99_seconds']:.1f} ms"),
        ("load: run (submit to result) p50", f"{1e3 * load['run_p50_seconds']:.1f} ms"),
        ("load: daemon RSS start / peak / end", f"{mib(load['rss_start_bytes'])} / {mib(load['rss_peak_bytes'])} / "
                                                f"{mib(load['rss_end_bytes'])}"),
    ]
    if soak:
        rows += [
            ("soak: requests sent (rate)", f"{soak['requests']:,} in {soak['seconds_sending']:.0f} s "
                                           f"({soak['rate_per_second']:.1f}/s)"),
            ("soak: SIGHUP reloads sent / logged", f"{soak['reloads_sent']} / {soak['reloads_logged']}"),
            ("soak: closed / lost / duplicated / failed", f"{soak['closed']:,} / {soak['lost']} / "
                                                          f"{soak['duplicates']} / {soak['failed']}"),
            ("soak: drop to record p50 / p99", f"{1e3 * soak['latency_p50_seconds']:.0f} / "
                                               f"{1e3 * soak['latency_p99_seconds']:.0f} ms"),
            ("soak: daemon RSS start / peak / end", f"{mib(soak['rss_start_bytes'])} / "
                                                    f"{mib(soak['rss_peak_bytes'])} / {mib(soak['rss_end_bytes'])}"),
        ]
    width = max(len(k) for k, _ in rows)
    head = (f"throttler load: {args.cluster} cluster, {args.workers} workers x 1 thread, "
            f"{args.files_per_group} files of 300 rows per group; load average {os.getloadavg()[0]:.2f}")
    lines = [head, "", f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    return "\n".join(lines + [f"| {k:<{width}} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="throttler-load-"))
    (work / "out").mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    try:
        groups = build_estate(work / "data", args.requests, args.files_per_group)
        scheduler = None
        if args.cluster == "external":
            scheduler, children = start_cluster(work, args.workers)
        daemon = start_daemon(work, scheduler, args.workers)
        children.append(daemon)
        load = load_phase(work, daemon, groups, args.timeout_seconds)
        soak = soak_phase(work, daemon, groups, args) if args.soak_seconds > 0 else None
        print(table(load, soak, args))
        if args.json:
            Path(args.json).write_text(json.dumps({"load": load, "soak": soak}, indent=1))
        bad = load["duplicates"] + (soak["lost"] + soak["duplicates"] if soak else 0)
        errors = re.findall(r"^.*(?:Traceback|ERROR).*$", daemon.log(), re.M)
        if errors:
            print(f"\n{len(errors)} error line(s) in the daemon log, first: {errors[0]}")
        return 1 if bad else 0
    finally:
        for child in reversed(children):
            child.stop()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

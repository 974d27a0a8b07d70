"""Helpers for end-to-end tests of ``throttler serve`` as a real process.

* :class:`Proc` starts a command in its own session (so its process group holds
  every child it forks, even orphans) with output to a log file, and remembers
  the group so :func:`leaked_processes` can prove nothing outlived the tests.
* :class:`ExternalCluster` is ``dask scheduler`` plus ``dask worker`` processes.
* :class:`Daemon` is ``python -m throttler serve`` with its log.
* :func:`throttler_cli` runs another subcommand and returns its completed process.
* :class:`NotifyListener` stands in for systemd's notification socket.
* :class:`RssSampler` keeps the highest RSS of the workers (the nannies' children).
* :func:`gate_workers` occupies every worker thread until a file appears, so
  groups stay submitted-but-unfinished for as long as a test needs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil

from tests.conftest import wait_for
from tests.helpers.datafiles import write_sim

#: process groups started by these helpers (each Proc is its own session leader)
STARTED_GROUPS: set[int] = set()

CHILD_ENV = {"DASK_LOGGING__DISTRIBUTED": "warning", "PYTHONUNBUFFERED": "1"}
#: inherited variables that would change what a child does (or notify an outer systemd)
SCRUBBED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "THROTTLER_")


def child_env(extra: dict | None = None) -> dict:
    """The test's environment without :data:`SCRUBBED`, plus CHILD_ENV and ``extra``
    (a None value removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    env.update(CHILD_ENV)
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """One command in its own session, stdout+stderr to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, cwd: str | None = None):
        self.argv, self.log_path = argv, Path(log_path)
        full_env = child_env(env)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                          start_new_session=True, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        STARTED_GROUPS.add(self.pid)  # session leader: pgid == pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout_seconds: float) -> int:
        return self.popen.wait(timeout_seconds)

    def kill_group(self) -> None:
        """SIGKILL every process still in this command's group, then reap the leader."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not group_members(self.pid), 10)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def leaked_processes() -> list[str]:
    """Processes still alive in any group these helpers started."""
    return [f"{p.pid} {' '.join(p.cmdline()[:4])}" for pgid in sorted(STARTED_GROUPS) for p in group_members(pgid)]


# ------------------------------------------------------------------------ the cluster


class ExternalCluster:
    """``dask scheduler`` + ``n_workers`` x ``dask worker`` (``nthreads`` threads, 1 GB by default), on loopback."""

    def __init__(self, log_dir: Path, n_workers: int = 2, memory_bytes: int = 1_000_000_000,
                 declare_memory: bool = True, nthreads: int = 1, resources: str | None = None):
        self.log_dir = Path(log_dir)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.client = None
        self.procs.append(Proc(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                               self.log_dir / "scheduler.log"))
        for i in range(n_workers):
            argv = ["dask", "worker", self.address, "--nthreads", str(nthreads), "--memory-limit", str(memory_bytes),
                    "--no-dashboard", "--name", f"w{i}"]
            if resources is not None:  # the worker's own resources, as given (replaces MEMORY=memory_bytes)
                argv += ["--resources", resources] if resources else []
            elif declare_memory:
                argv += ["--resources", f"MEMORY={memory_bytes}"]
            self.procs.append(Proc(argv, self.log_dir / f"worker{i}.log"))

    def connect(self, n_workers: int, timeout_seconds: float = 60.0):
        """A client in the test process, once ``n_workers`` workers have joined."""
        from distributed import Client

        deadline = time.monotonic() + timeout_seconds
        while True:  # the scheduler may not listen yet
            try:
                self.client = Client(self.address, timeout="2s")
                break
            except OSError:
                if time.monotonic() > deadline or any(p.popen.poll() is not None for p in self.procs):
                    raise AssertionError(f"scheduler {self.address} not reachable\n{self.logs()}") from None
                time.sleep(0.1)
        self.client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
        return self.client

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in self.procs)

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception:  # noqa: BLE001 - teardown goes on regardless
                pass
        for proc in reversed(self.procs):
            proc.kill_group()


class RssSampler:
    """Samples every worker process's RSS (the nannies' children) every 20 ms; keeps the highest."""

    def __init__(self, nanny_pids: list[int]):
        self.nanny_pids, self.peak_bytes = nanny_pids, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for nanny in self.nanny_pids:
                try:
                    for child in psutil.Process(nanny).children():
                        self.peak_bytes = max(self.peak_bytes, child.memory_info().rss)
                except psutil.Error:
                    continue

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak_bytes


def gate_workers(client, gate_file: Path) -> list:
    """Occupy every worker's threads with a task that returns once ``gate_file`` exists.

    Returns the futures; the caller creates ``gate_file`` to release them. Tasks
    submitted meanwhile (e.g. the daemon's groups) stay queued on the workers.
    """
    def hold(path, tag):
        Path(f"{path}.started.{tag}").touch()
        while not os.path.exists(path):
            time.sleep(0.02)
        return True

    futures, tags = [], []
    for n, (address, info) in enumerate(client.scheduler_info()["workers"].items()):
        for slot in range(info["nthreads"]):
            tags.append(f"{n}-{slot}")
            futures.append(client.submit(hold, str(gate_file), tags[-1], workers=[address],
                                         allow_other_workers=False, pure=False))
    wait_for(lambda: all(os.path.exists(f"{gate_file}.started.{tag}") for tag in tags), 30)
    return futures


# ------------------------------------------------------------------------ the daemon


class Daemon:
    """``python -m throttler serve ARGS`` with its log; one instance per start."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args = args
        self._log_offset = Path(log_path).stat().st_size if Path(log_path).exists() else 0
        self.proc = Proc([sys.executable, "-m", "throttler", "serve", *args], log_path, env)
        self.pid = self.proc.pid

    def log(self) -> str:
        """This start's part of the log file."""
        with open(self.proc.log_path, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def wait_for_log(self, text: str, timeout_seconds: float = 60.0) -> None:
        def seen():
            if self.proc.popen.poll() is not None and text not in self.log():
                raise AssertionError(f"daemon exited ({self.proc.popen.returncode}) before logging "
                                     f"{text!r}:\n{self.log()}")
            return text in self.log()
        try:
            wait_for(seen, timeout_seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; waiting for {text!r} in the daemon log:\n{self.log()}") from None

    def wait_ready(self, timeout_seconds: float = 60.0) -> None:
        self.wait_for_log("serving spool", timeout_seconds)

    def metrics_url(self) -> str:
        match = re.search(r"metrics on (http://\S+/metrics)", self.log())
        assert match, f"no metrics address in the log:\n{self.log()}"
        return match.group(1)

    def stop(self, timeout_seconds: float) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took)."""
        started = time.monotonic()
        self.proc.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout_seconds} s:\n{self.log()}") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        self.proc.kill_group()


def throttler_cli(*args: str, timeout_seconds: float = 60.0, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m throttler ARGS`` (in ``cwd``) to completion; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "throttler", *args], capture_output=True, text=True,
                          timeout=timeout_seconds, env=child_env(), stdin=subprocess.DEVNULL, cwd=cwd)


def serve_args(tmp_path: Path, scheduler: str | None = None, *extra: str) -> list[str]:
    """The usual ``serve`` arguments for a test directory (its data root and output made, as an operator does)."""
    for made in ("out", "data"):
        (tmp_path / made).mkdir(exist_ok=True)
    args = ["--spool", str(tmp_path / "spool"), "--data-root", str(tmp_path / "data"),
            "--output", str(tmp_path / "out"), "--metrics-address", "127.0.0.1:0",
            "--poll-seconds", "0.05", "--rescan-seconds", "0.5"]
    if scheduler:
        args += ["--scheduler", scheduler]
    return args + list(extra)


# ------------------------------------------------------------------------ sd_notify


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd; keeps (monotonic time, message)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.messages)

    def index(self, prefix: str, after: int = -1) -> int:
        """Index of the first message after ``after`` starting with ``prefix``, or -1."""
        for i, (_, message) in enumerate(self.snapshot()):
            if i > after and message.startswith(prefix):
                return i
        return -1

    def wait(self, prefix: str, after: int = -1, timeout_seconds: float = 30.0) -> int:
        try:
            wait_for(lambda: self.index(prefix, after) >= 0, timeout_seconds)
        except AssertionError:
            raise AssertionError(f"no {prefix!r} after message {after}: {self.snapshot()}") from None
        return self.index(prefix, after)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def times_of(self, message: str) -> list[float]:
        """Arrival times of every datagram equal to ``message``."""
        return [t for t, m in self.snapshot() if m == message]


# ------------------------------------------------------------------------ data and records


def make_estate(root: Path, groups: dict[str, int], **kw) -> dict[str, list[str]]:
    """``root/<group>/fNNN.parquet`` files (stable seeds); returns each group's paths."""
    out = {}
    for group, n in groups.items():
        os.makedirs(root / group, exist_ok=True)
        out[group] = [write_sim(root / group / f"f{i:03d}.parquet", seed=zlib.crc32(f"{group}/{i}".encode()) % 1000,
                                **kw) for i in range(n)]
    return out


def drop_request(spool_root: Path, name: str, content: bytes = b"") -> None:
    """A request written with plain file operations, as another program would."""
    tmp = Path(spool_root) / "tmp" / name
    tmp.write_bytes(content)
    os.rename(tmp, Path(spool_root) / "incoming" / name)


def records(spool_root: Path, kind: str) -> list[dict]:
    folder = Path(spool_root) / kind
    out = []
    for path in sorted(folder.glob("*.json")):
        out.append(json.loads(path.read_text()))
    return out


def closed_requests(spool_root: Path) -> list[str]:
    """Every request name listed by a record in done/ or failed/ (duplicates kept)."""
    return [name for kind in ("done", "failed") for r in records(spool_root, kind) for name in r["requests"]]


def wait_closed(spool_root: Path, expected: int, timeout_seconds: float, daemon: Daemon | None = None) -> None:
    """Until ``expected`` request files are closed by records and incoming/ and active/
    are empty (a run's files are removed just after its record is written)."""
    spool_root = Path(spool_root)

    def settled():
        return (len(closed_requests(spool_root)) >= expected and not listing(spool_root / "incoming")
                and not listing(spool_root / "active"))
    try:
        wait_for(settled, timeout_seconds)
    except AssertionError:
        raise AssertionError(f"{len(closed_requests(spool_root))} of {expected} requests closed after "
                             f"{timeout_seconds} s; incoming/ {listing(spool_root / 'incoming')}, active/ "
                             f"{listing(spool_root / 'active')}\n{daemon.log() if daemon else ''}") from None


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))

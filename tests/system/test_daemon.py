"""``throttler serve`` as a real process against real Dask processes.

Every daemon, scheduler and worker here is a separate process in its own
session; fixtures kill each process group at teardown and the module ends by
checking that none of them is left. Logs are printed at teardown (pytest shows
them only when a test fails).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import pytest

from tests.conftest import wait_for
from tests.helpers.daemon import (
    Daemon,
    ExternalCluster,
    NotifyListener,
    closed_requests,
    drop_request,
    free_port,
    gate_workers,
    leaked_processes,
    listing,
    make_estate,
    records,
    serve_args,
    throttler_cli,
    wait_closed,
)
from tests.helpers.datafiles import assert_matches_reference, write_sim
from throttler.commands import serve as daemon_mod

WORKER_MEMORY_BYTES = 1_000_000_000
SHUTDOWN_LINES = ("shutdown 1/4: intake stopped", "shutdown 2/4: admission stopped",
                  "shutdown 3/4:", "shutdown 4/4:", "INFO throttler.commands.serve: stopped")


@pytest.fixture(scope="module", autouse=True)
def no_leaked_processes():
    """Runs last in the module: every process the tests started must be gone."""
    yield
    assert not leaked_processes(), f"processes left behind: {leaked_processes()}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One external cluster for the module: 2 workers x 1 thread, 1 GB, declaring MEMORY."""
    cluster = ExternalCluster(tmp_path_factory.mktemp("cluster"), n_workers=2)
    try:
        cluster.connect(2)
        yield cluster
    finally:
        print(cluster.logs())
        cluster.close()


@pytest.fixture()
def daemons(tmp_path):
    """Start daemons with ``daemons(args, env=...)``; kills leftovers and prints logs at teardown."""
    started: list[Daemon] = []

    def start(args, env=None, name="daemon.log") -> Daemon:
        daemon = Daemon(args, tmp_path / name, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
        print(f"--- daemon pid {daemon.pid} ({daemon.proc.log_path.name}):\n{daemon.log()}")


def assert_shutdown_logged_in_order(log: str) -> None:
    positions = [log.find(line) for line in SHUTDOWN_LINES]
    assert -1 not in positions and positions == sorted(positions), \
        f"shutdown lines missing or out of order: {dict(zip(SHUTDOWN_LINES, positions))}\n{log}"


def assert_outputs_match(tmp_path, estate) -> None:
    for group in estate:
        assert_matches_reference(tmp_path / "out" / f"{group}.parquet", estate[group])


# ---------------------------------------------------------------------------- external cluster


def test_external_cluster_cli_and_dropped_requests_then_sigterm(tmp_path, cluster, daemons):
    estate = make_estate(tmp_path / "data", {"g1": 3, "g2": 2, "g3": 1, "g4": 4})
    daemon = daemons(serve_args(tmp_path, cluster.address, "--drain-timeout-seconds", "20"))
    daemon.wait_ready()
    assert "connected to scheduler " + cluster.address in daemon.log()
    assert re.search(rf"serving spool {tmp_path}/spool; data root {tmp_path}/data; output {tmp_path}/out; "
                     rf"scheduler {cluster.address}; metrics http://127\.0\.0\.1:\d+/metrics", daemon.log()), daemon.log()

    submitted = throttler_cli("submit", "g1", "g2", "--spool", str(tmp_path / "spool"))
    assert submitted.returncode == 0, submitted.stderr
    assert re.findall(r"^queued (g\d) as \S+\.json$", submitted.stdout, re.M) == ["g1", "g2"]
    spool = tmp_path / "spool"
    drop_request(spool, "g3")
    drop_request(spool, "req-g4.json", json.dumps({"group": "g4", "strategy": "sum", "priority": 3}).encode())
    wait_closed(spool, 4, 60, daemon)

    done = {r["group"]: r for r in records(spool, "done")}
    assert sorted(done) == ["g1", "g2", "g3", "g4"] and not records(spool, "failed")
    assert done["g4"]["strategy"] == "sum" and done["g1"]["strategy"] == "aligned"
    assert_outputs_match(tmp_path, estate)
    assert all(r["rows"] == 300 and r["attempts"] == 1 for r in done.values())

    status = throttler_cli("status", "--spool", str(spool), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["queue"] == {"incoming": 0, "active": 0, "done": 4, "failed": 0}
    daemon_doc = doc["daemon"]
    assert daemon_doc["pid"] == daemon.pid and daemon_doc["workers"]["running"] == 2
    assert daemon_doc["cluster_memory"]["limit_bytes"] == 2 * int(WORKER_MEMORY_BYTES * 0.6)
    assert set(daemon_doc["states"]) == {"queued", "planning", "waiting", "running"}
    human = throttler_cli("status", "--spool", str(spool)).stdout
    assert "queue: incoming 0  active 0  done 4  failed 0" in human
    assert doc["running"] is True and doc["not_running_reason"] is None
    assert human.splitlines()[1].startswith(f"daemon pid {daemon.pid}: states "), human

    metrics = urllib.request.urlopen(daemon.metrics_url(), timeout=10).read().decode()
    assert "throttler_requests_received_total 4.0" in metrics
    assert 'throttler_groups_finished_total{outcome="done",strategy="sum"} 1.0' in metrics

    plan = throttler_cli("plan", "g4", "--data-root", str(tmp_path / "data"), "--scheduler", cluster.address)
    assert plan.returncode == 0, plan.stderr
    assert "group g4: 4 files" in plan.stdout and "fits now: yes (" in plan.stdout, plan.stdout

    code, seconds = daemon.stop(20)
    assert code == 0 and seconds < 20, daemon.log()
    stopped = throttler_cli("status", "--spool", str(spool))
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert re.match(rf"throttler is not running \(last seen \d+ s ago, pid {daemon.pid}\): its pid "
                    rf"{daemon.pid} is gone", stopped.stdout), stopped.stdout
    assert "queue: incoming 0  active 0  done 4  failed 0" in stopped.stdout
    assert f"last known daemon pid {daemon.pid}: states" in stopped.stdout, stopped.stdout
    assert_shutdown_logged_in_order(daemon.log())
    assert "shutdown 3/4: 0 unstarted" in daemon.log() and "shutdown 4/4: 0 running" in daemon.log()
    assert "Traceback" not in daemon.log()


def test_run_command_against_external_cluster(tmp_path, cluster):
    estate = make_estate(tmp_path / "data", {"solo": 3})
    result = throttler_cli("run", "solo", "missing", "--data-root", str(tmp_path / "data"),
                           "--output", str(tmp_path / "out"), "--scheduler", cluster.address)
    assert result.returncode == 1, (result.stdout, result.stderr)  # "missing" failed
    assert re.search(r"^ok +solo: 300 rows from 3 files", result.stdout, re.M), result.stdout
    assert "FAILED missing: CatalogError: unknown group 'missing'" in result.stdout
    assert_outputs_match(tmp_path, estate)


def test_run_with_relative_paths_against_workers_started_elsewhere(tmp_path, cluster):
    """``--data-root data --output out``, relative to the command's directory, while the workers run
    in another one: the paths the tasks get are the command's, made absolute (a relative output was
    opened in the worker's directory: FileNotFoundError, retried as an outage, never done)."""
    estate = make_estate(tmp_path / "data", {"solo": 3})
    assert os.getcwd() != str(tmp_path)  # the workers' directory (this process's) is not the command's
    result = throttler_cli("run", "solo", "--data-root", "data", "--output", "out", "--scheduler", cluster.address,
                           cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert re.search(r"^ok +solo: 300 rows from 3 files", result.stdout, re.M), result.stdout
    assert_outputs_match(tmp_path, estate)


def _serve_one_group(tmp_path, daemons, address: str, group: str, n_files: int):
    """A daemon on the cluster at ``address``, one group of ``n_files`` queued and done, its output
    checked; returns the daemon and the group's done record."""
    estate = make_estate(tmp_path / "data", {group: n_files})
    daemon = daemons(serve_args(tmp_path, address))
    daemon.wait_ready()
    drop_request(tmp_path / "spool", group)
    wait_closed(tmp_path / "spool", 1, 60, daemon)
    (done,) = records(tmp_path / "spool", "done")
    assert done["group"] == group
    assert_outputs_match(tmp_path, estate)
    return daemon, done


def test_workers_started_with_defaults_get_the_daemons_own_memory_resources(tmp_path, daemons):
    (tmp_path / "plain").mkdir()
    plain = ExternalCluster(tmp_path / "plain", n_workers=1, declare_memory=False)
    try:
        plain.connect(1)
        daemon, _ = _serve_one_group(tmp_path, daemons, plain.address, "bare", 2)
        resources = plain.client.run(lambda dask_worker: dict(dask_worker.state.total_resources))
        (own,) = resources.values()
        assert sorted(own) == ["throttler-memory-bytes", "throttler-solo-bytes", "throttler-worker"], own
        assert 0 < own["throttler-memory-bytes"] < own["throttler-solo-bytes"] < 0.8 * WORKER_MEMORY_BYTES
        code, _ = daemon.stop(20)
        assert code == 0
    finally:
        print(plain.logs())
        plain.close()


def test_an_incompatible_worker_and_one_without_a_memory_limit_are_reported_and_the_daemon_serves_on(
        tmp_path, daemons):
    """A worker whose installed dask-throttler is not the daemon's: an error in the log naming
    it, the gauge, the status file and ``throttler status``; groups are still served."""
    from tests.helpers.daemon import Proc, child_env
    from throttler import __version__

    other = tmp_path / "other-install"
    dist_info = other / "dask_throttler-0.0.1.dist-info"
    dist_info.mkdir(parents=True)  # found before site-packages on the worker's sys.path
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dask-throttler\nVersion: 0.0.1\n")
    (tmp_path / "mixed").mkdir()
    mixed = ExternalCluster(tmp_path / "mixed", n_workers=1)
    env = child_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(other), os.environ.get("PYTHONPATH")]))})
    mixed.procs.append(Proc(["dask", "worker", mixed.address, "--nthreads", "1", "--memory-limit", "1GB",
                             "--resources", "MEMORY=1000000000", "--no-dashboard", "--name", "old"],
                            tmp_path / "mixed" / "old-worker.log", env))
    mixed.procs.append(Proc(["dask", "worker", mixed.address, "--nthreads", "1", "--memory-limit", "0",
                             "--no-dashboard", "--name", "unlimited"], tmp_path / "mixed" / "unlimited.log"))
    try:
        client = mixed.connect(3)
        unlimited = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "unlimited")
        old = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "old")
        estate = make_estate(tmp_path / "data", {"mixed": 3})
        daemon = daemons(serve_args(tmp_path, mixed.address))
        daemon.wait_ready()
        daemon.wait_for_log(f"worker {old} cannot run this daemon's tasks as expected: dask-throttler 0.0.1 "
                            f"is installed there; this daemon runs {__version__}")
        assert daemon.log().count("cannot run this daemon's tasks") == 1, daemon.log()

        drop_request(tmp_path / "spool", "mixed")
        wait_closed(tmp_path / "spool", 1, 60, daemon)
        assert [r["group"] for r in records(tmp_path / "spool", "done")] == ["mixed"]
        assert_outputs_match(tmp_path, estate)

        def scrape() -> str:
            return urllib.request.urlopen(daemon.metrics_url(), timeout=10).read().decode()

        wait_for(lambda: "throttler_workers_incompatible 1.0" in scrape(), 10)  # published once a second
        wait_for(lambda: json.loads(throttler_cli("status", "--spool", str(tmp_path / "spool"), "--json").stdout)
                 ["daemon"]["workers_incompatible"].get(old, "").startswith("dask-throttler 0.0.1"))
        wait_for(lambda: "throttler_workers_without_memory_limit 1.0" in scrape(), 10)
        human = throttler_cli("status", "--spool", str(tmp_path / "spool")).stdout
        assert f"INCOMPATIBLE worker {old}: dask-throttler 0.0.1 is installed there" in human, human
        assert f"worker {unlimited} has no memory limit: sized from an assumed limit" in human, human
        code, _ = daemon.stop(20)
        assert code == 0
    finally:
        print(mixed.logs())
        mixed.close()


def test_two_workers_each_given_most_of_the_host_are_admitted_as_their_share_of_it(tmp_path, daemons):
    """Two ``dask worker`` processes on this host, each with a limit of 3/4 of its memory (as two
    workers started with Dask's defaults on one host each get all of it): the daemon's admission
    capacity is their share of the host, not 1.5 hosts; it says so (log, gauge, status) and serves."""
    from distributed.system import MEMORY_LIMIT

    from throttler.config import DEFAULTS

    each = MEMORY_LIMIT * 3 // 4
    (tmp_path / "pair").mkdir()
    pair = ExternalCluster(tmp_path / "pair", n_workers=2, memory_bytes=each, nthreads=2, declare_memory=False)
    try:
        pair.connect(2)
        daemon, _ = _serve_one_group(tmp_path, daemons, pair.address, "pair", 3)

        def status() -> dict:
            return json.loads(throttler_cli("status", "--spool", str(tmp_path / "spool"), "--json").stdout)["daemon"]
        share = each * MEMORY_LIMIT // (2 * each)
        wait_for(lambda: len(status()["workers_host_capped"]) == 2, 10)
        assert status()["cluster_memory"]["limit_bytes"] == 2 * int(share * DEFAULTS.memory_fraction)
        assert all(v == {"memory_limit_bytes": each, "sized_limit_bytes": share}
                   for v in status()["workers_host_capped"].values())
        scraped = urllib.request.urlopen(daemon.metrics_url(), timeout=10).read().decode()
        assert "throttler_workers_host_capped 2.0" in scraped
        human = throttler_cli("status", "--spool", str(tmp_path / "spool")).stdout
        assert human.count("overcommits its machine with the others there: sized to its share") == 2, human
        code, _ = daemon.stop(20)
        assert code == 0
    finally:
        print(pair.logs())
        pair.close()


# ---------------------------------------------------------------------------- sd_notify


def test_sd_notify_ready_watchdog_reload_and_stop(tmp_path, daemons):
    make_estate(tmp_path / "data", {"n1": 2})
    config = tmp_path / "throttler.toml"
    config.write_text("[throttler]\nmemory_fraction = 0.5\n")
    listener = NotifyListener(tmp_path / "notify")
    try:
        env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000"}  # no WATCHDOG_PID: "for us"
        # a rescan period just under the ping period: wake-ups must not push pings back
        args = serve_args(tmp_path, None, "--config", str(config), "--workers", "1",
                          "--worker-memory-bytes", str(WORKER_MEMORY_BYTES), "--rescan-seconds", "0.95")
        daemon = daemons(args, env=env)
        ready = listener.wait("READY=1", timeout_seconds=60)
        daemon.wait_ready()
        assert re.fullmatch(r"READY=1\nSTATUS=queued \d+, waiting \d+, running \d+; .*", listener.snapshot()[ready][1])
        drop_request(tmp_path / "spool", "n1")
        wait_closed(tmp_path / "spool", 1, 60, daemon)

        wait_for(lambda: len(listener.times_of("WATCHDOG=1")) >= 3, 10)  # ~1 s apart: 3 within about 3 s
        times = listener.times_of("WATCHDOG=1")
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(0.9 <= gap <= 1.5 for gap in gaps), f"watchdog gaps {gaps} (WATCHDOG_USEC/2 = 1 s)"
        assert any(m.startswith("STATUS=queued ") for _, m in listener.snapshot()[ready + 1:])

        config.write_text("[throttler]\nmemory_fraction = 0.4\n")
        daemon.proc.signal(signal.SIGHUP)
        reloading = listener.wait("RELOADING=1", after=ready)
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", listener.snapshot()[reloading][1])
        usec = int(listener.snapshot()[reloading][1].rsplit("=", 1)[1])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
        reloaded = listener.wait("READY=1", after=reloading)
        daemon.wait_for_log("configuration reloaded: {'memory_fraction': 0.4}")

        last = reloaded
        for bad, complaint in (("memory_fraction = 2.0", "memory_fraction must be within"),
                               ('log_level = "verbose"', "log_level must be one of")):
            config.write_text(f"[throttler]\n{bad}\n")  # invalid: refused, the daemon keeps running
            daemon.proc.signal(signal.SIGHUP)
            last = listener.wait("READY=1", after=listener.wait("RELOADING=1", after=last))
            daemon.wait_for_log(f"reload refused, keeping the running configuration: {complaint}")
        config.write_text('[throttler]\nmemory_fraction = 0.4\nlog_level = "warning"\nthreads_per_worker = 2\n')
        daemon.proc.signal(signal.SIGHUP)
        last = listener.wait("READY=1", after=listener.wait("RELOADING=1", after=last))
        daemon.wait_for_log("configuration change(s) to threads_per_worker need a restart")
        assert "configuration reloaded: {'log_level': 'warning'}" in daemon.log()  # shown, then quieter
        config.write_text('[throttler]\nmemory_fraction = 0.4\nlog_level = "info"\n')
        daemon.proc.signal(signal.SIGHUP)
        last = listener.wait("READY=1", after=listener.wait("RELOADING=1", after=last))
        daemon.wait_for_log("configuration reloaded: {'log_level': 'info'}")

        code, _ = daemon.stop(30)
        assert code == 0, daemon.log()
        assert listener.index("STOPPING=1", after=last) > last
        assert_shutdown_logged_in_order(daemon.log())
    finally:
        listener.close()


def test_main_loop_never_sleeps_past_the_next_watchdog_ping():
    now = time.monotonic()
    assert daemon_mod._wait_seconds(5.0, None, 0.0) == 1.0
    assert daemon_mod._wait_seconds(0.25, None, 0.0) == 0.25
    assert 0.0 < daemon_mod._wait_seconds(5.0, 1.0, now - 0.7) <= 0.3
    assert daemon_mod._wait_seconds(5.0, 1.0, now - 3.0) == 0.0


def test_unknown_log_level_is_a_configuration_error(tmp_path):
    result = throttler_cli("serve", *serve_args(tmp_path), "--log-level", "verbose")
    assert result.returncode == 2 and "throttler: log_level must be one of" in result.stderr, result.stderr


def test_ctrl_c_in_a_terminal_drains_a_daemon_on_its_embedded_cluster(tmp_path, daemons):
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group: the daemon and the
    embedded cluster's worker processes alike. The workers ignore it, so the drain lets the running
    group (80 seed-shaped files, several seconds) finish on them: done, its output complete, exit 0,
    and no worker died of the signal."""
    group = tmp_path / "data" / "long"
    group.mkdir(parents=True)
    physical = write_sim(tmp_path / "physical.parquet", 50_000, 120, seed=5)
    files = [str(group / f"f{i:03d}.parquet") for i in range(80)]
    for path in files:
        os.link(physical, path)
    daemon = daemons(serve_args(tmp_path, None, "--workers", "2", "--worker-memory-bytes", str(3 * 2**30),
                                "--drain-timeout-seconds", "120"))
    daemon.wait_ready(120)
    assert throttler_cli("submit", "long", "--spool", str(tmp_path / "spool")).returncode == 0
    daemon.wait_for_log("INFO throttler.service.service: submitted long", 60)
    os.killpg(daemon.pid, signal.SIGINT)
    code = daemon.proc.wait(150)
    log = daemon.log()
    assert code == 0, log
    assert "shutdown 4/4: 0 running group(s) left at the deadline" in log, log
    assert "KeyboardInterrupt" not in log and "Traceback" not in log, log
    assert [r["group"] for r in records(tmp_path / "spool", "done")] == ["long"]
    assert_matches_reference(tmp_path / "out" / "long.parquet", files)


def test_sigterm_while_the_scheduler_is_unreachable_exits_cleanly(tmp_path, daemons):
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    daemon = daemons(serve_args(tmp_path, dead))
    daemon.wait_for_log("metrics on http://")  # now retrying the scheduler
    wait_for(lambda: "unreachable (attempt 1" in daemon.log(), 30)  # each failed attempt is logged
    status = throttler_cli("status", "--spool", str(tmp_path / "spool"))
    assert status.returncode == 0, status.stdout + status.stderr  # this daemon, not a dead one's status
    assert re.search(rf"^daemon pid {daemon.pid}: starting, connecting to scheduler {dead} for \d+ s$",
                     status.stdout, re.M), status.stdout
    drop_request(tmp_path / "spool", "early")
    code, seconds = daemon.stop(20)  # one connection attempt (10 s) at most
    assert code == 0 and "stopped while connecting to the scheduler" in daemon.log()
    assert listing(tmp_path / "spool" / "incoming") == ["early"] and not closed_requests(tmp_path / "spool")


# ---------------------------------------------------------------------------- crash and restart


def test_kill_9_while_running_then_restart_closes_every_request_once(tmp_path, cluster, daemons):
    groups = {f"c{i:02d}": 2 + i % 3 for i in range(12)}
    estate = make_estate(tmp_path / "data", groups, n_paths=400, n_dates=24)
    spool = tmp_path / "spool"
    submitted = throttler_cli("submit", *groups, "c00", "c05", "--spool", str(spool))  # two duplicates
    assert submitted.returncode == 0, submitted.stderr
    requests = listing(spool / "incoming")
    assert len(requests) == 14
    args = serve_args(tmp_path, cluster.address)

    first = daemons(args, name="first.log")

    def running() -> set[str]:  # submitted to the cluster (the log), not yet recorded done (records are atomic)
        return set(re.findall(r"submitted (c\d\d) ", first.log())) - {r["group"] for r in records(spool, "done")}

    # killed once a group is done and another is running on the cluster: both kinds of claim are left behind
    wait_for(lambda: os.listdir(spool / "done") and running(), 60, interval_seconds=0.005)
    first.kill()  # SIGKILL to its process group (the daemon alone: the cluster is external)
    assert first.proc.popen.returncode == -signal.SIGKILL
    runs = {run: listing(spool / "active" / run) for run in listing(spool / "active")}
    recorded = {run for run in runs if (spool / "done" / f"{run}.json").exists()}  # died before cleanup
    unfinished = running()
    print(f"crash left {len(runs)} run(s) in active/ ({len(recorded)} recorded); running: {sorted(unfinished)}")
    assert len(runs) > len(recorded) and unfinished, "the crash came too late to interrupt running groups"
    assert "shutdown 1/4" not in first.log()
    dead = throttler_cli("status", "--spool", str(spool), "--json")
    assert dead.returncode == 3, dead.stdout + dead.stderr
    doc = json.loads(dead.stdout)
    assert doc["running"] is False and doc["not_running_reason"] == f"its pid {first.pid} is gone"
    assert doc["queue"]["active"] == len(runs)  # counted from the directories, not the status file

    second = daemons(args, name="second.log")
    wait_closed(spool, 14, 90, second)
    closed = closed_requests(spool)
    assert sorted(closed) == sorted(requests), "each request must be closed exactly once"
    assert not listing(spool / "incoming") and not listing(spool / "active")
    assert not records(spool, "failed")
    assert {r["group"] for r in records(spool, "done")} == set(groups)
    assert_outputs_match(tmp_path, estate)
    assert not [n for n in listing(tmp_path / "out") if n.startswith(".") and n.endswith(".tmp")]
    requeued = sum(len(files) for run, files in runs.items() if run not in recorded)
    assert f"spool recovered: {{'requeued': {requeued}, 'closed': {len(recorded)}}}" in second.log()
    code, _ = second.stop(30)
    assert code == 0


def test_second_sigterm_exits_at_once_and_claims_are_requeued(tmp_path, cluster, daemons):
    """Groups held running (their tasks queue behind gate tasks on every worker thread):
    a second SIGTERM during the drain exits at once and leaves the claims in active/;
    the next start requeues them; a drain that reaches its deadline puts running
    groups back in incoming/; once the gate opens, a last start finishes them."""
    estate = make_estate(tmp_path / "data", {"s1": 2, "s2": 3, "s3": 1})
    spool = tmp_path / "spool"
    gate = tmp_path / "gate"
    gates = gate_workers(cluster.client, gate)
    try:
        first = daemons(serve_args(tmp_path, cluster.address, "--drain-timeout-seconds", "60"), name="first.log")
        first.wait_ready()
        assert throttler_cli("submit", "s1", "s2", "s3", "--spool", str(spool)).returncode == 0
        wait_for(lambda: first.log().count("INFO throttler.service.service: submitted ") == 3, 60)
        first.proc.signal(signal.SIGTERM)
        first.wait_for_log("shutdown 3/4")  # now draining: waiting for the three running groups
        draining = throttler_cli("status", "--spool", str(spool))  # alive and draining, not "not running"
        assert draining.returncode == 0, draining.stdout + draining.stderr
        deadline = re.search(r"^draining: 3 running group\(s\), deadline in (\d+) s$", draining.stdout, re.M)
        assert deadline and 40 <= int(deadline[1]) <= 60, draining.stdout
        started = time.monotonic()
        first.proc.signal(signal.SIGTERM)
        assert first.proc.wait(10) == 128 + signal.SIGTERM and time.monotonic() - started < 5
        assert "shutdown 4/4" not in first.log()
        assert len(listing(spool / "active")) == 3 and not closed_requests(spool)

        second = daemons(serve_args(tmp_path, cluster.address, "--drain-timeout-seconds", "1"), name="second.log")
        second.wait_for_log("spool recovered: {'requeued': 3, 'closed': 0}")
        wait_for(lambda: second.log().count("INFO throttler.service.service: submitted ") == 3, 60)
        code, seconds = second.stop(20)
        assert code == 0 and 1 <= seconds < 10, second.log()
        assert "shutdown 4/4: 3 running group(s) left at the deadline, put back" in second.log()
        assert_shutdown_logged_in_order(second.log())
        assert len(listing(spool / "incoming")) == 3 and not listing(spool / "active")
        assert not closed_requests(spool)
    finally:
        gate.touch()
        cluster.client.gather(gates)

    third = daemons(serve_args(tmp_path, cluster.address), name="third.log")
    wait_closed(spool, 3, 60, third)
    assert sorted(r["group"] for r in records(spool, "done")) == ["s1", "s2", "s3"]
    assert not listing(spool / "active") and not listing(spool / "incoming")
    assert_outputs_match(tmp_path, estate)
    code, _ = third.stop(30)
    assert code == 0

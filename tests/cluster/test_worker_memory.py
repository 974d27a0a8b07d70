"""The daemon's worker resources on a real ``dask scheduler`` with ``dask worker`` processes
started without any throttler flag."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from tests.conftest import wait_for
from tests.helpers.daemon import Proc, free_port
from throttler.cluster import worker_memory as wm

LIMIT_BYTES = 1 * 2**30


def _worker(cluster_dir, address, name, *extra):
    argv = ["dask", "worker", address, "--nthreads", "2", "--memory-limit", str(LIMIT_BYTES),
            "--no-dashboard", "--name", name, *extra]
    return Proc(argv, cluster_dir / f"{name}.log")


@contextlib.contextmanager
def _plain_cluster(logs, workers, n_workers: int = 2):
    """A ``dask scheduler`` and the processes ``workers(address)`` starts, the plugin registered
    once ``n_workers`` have joined; yields (client, address, procs)."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [Proc(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                  logs / "scheduler.log")]
    client = None
    try:
        procs += workers(address)
        wait_for(lambda: _reachable(address), 60)
        client = Client(address, timeout="5s")
        client.wait_for_workers(n_workers, timeout=60)
        wm.register(client)
        yield client, address, procs
    finally:
        if client is not None:
            client.close()
        for p in reversed(procs):
            p.kill_group()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("wm-cluster")
    with _plain_cluster(logs, lambda address: [
            _worker(logs, address, "w0"), _worker(logs, address, "w1", "--resources", "MEMORY=2000")]) \
            as (client, address, procs):
        yield {"client": client, "address": address, "logs": logs, "procs": procs}


def _reachable(address) -> bool:
    import socket

    host, port = address.split("//")[1].split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _sized(client, names) -> dict[str, wm.WorkerCapacity]:
    caps = {c.name: c for c in wm.read_capacities(client)}
    return caps if all(n in caps and caps[n].solo_bytes > 0 and caps[n].limit_source for n in names) else {}


def _reports(client) -> dict[str, dict]:
    """The latest sizing event of each live worker, by name."""
    live = set(client.scheduler_info()["workers"])
    return {m["name"]: m for _, m in client.get_events(wm.EVENT_TOPIC) if m["worker"] in live}


def test_every_worker_gets_the_resources_and_keeps_its_own(cluster):
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w0", "w1"]), 30)
    caps, reports = _sized(client, ["w0", "w1"]), _reports(client)
    for name in ("w0", "w1"):
        idle = reports[name]["idle_rss_bytes"]
        assert caps[name].memory_bytes == int(LIMIT_BYTES * wm.DEFAULT_SHARE) - idle
        assert caps[name].solo_bytes == int(LIMIT_BYTES * (0.8 - wm.SOLO_MARGIN)) - idle
        assert caps[name].limit_source == "memory_limit"
    resources = {w["name"]: w["resources"] for w in client.scheduler_info()["workers"].values()}
    assert resources["w1"]["MEMORY"] == 2000  # the user's own resource, untouched
    assert "MEMORY" not in resources["w0"]
    assert resources["w0"][wm.WORKER_TOKEN] == 1.0


def _pid_of(client, name) -> int:
    return next(pid for pid in client.run(os.getpid, workers=[_address_of(client, name)]).values())


def _address_of(client, name) -> str | None:
    """The worker's address, None while no worker of that name is connected (between a death and its restart)."""
    return next((a for a, w in client.scheduler_info()["workers"].items() if w["name"] == name), None)


def _new_pid(client, name, old_pid) -> bool:
    """A worker of that name is connected and runs in another process than ``old_pid``."""
    try:
        return _address_of(client, name) is not None and _pid_of(client, name) != old_pid
    except Exception:  # noqa: BLE001 - gone between the lookup and the call: not back yet
        return False


def test_a_worker_restarted_by_its_nanny_gets_them_again(cluster):
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w0"]), 30)
    old_pid = _pid_of(client, "w0")
    os.kill(old_pid, signal.SIGKILL)  # the nanny starts a new worker process
    try:  # by its pid: the new process may well bind the port the old one had
        wait_for(lambda: _new_pid(client, "w0", old_pid) and _sized(client, ["w0"]), 60)
    except AssertionError:  # seen once in CI, not reproduced: say what the nanny and the scheduler did
        scheduler, w0 = cluster["procs"][0], cluster["procs"][1]
        raise AssertionError(f"w0 not back and sized: workers {sorted(client.scheduler_info()['workers'])}\n"
                             f"--- w0 (nanny) log\n{w0.log()[-4000:]}\n--- scheduler log\n"
                             f"{scheduler.log()[-3000:]}") from None
    assert _sized(client, ["w0"])["w0"].memory_bytes == int(LIMIT_BYTES * wm.DEFAULT_SHARE) - \
        _reports(client)["w0"]["idle_rss_bytes"]


def test_a_worker_added_later_without_a_limit_is_sized_from_its_host(cluster):
    from distributed.system import MEMORY_LIMIT

    client = cluster["client"]
    proc = Proc(["dask", "worker", cluster["address"], "--nthreads", "1", "--memory-limit", "0",
                 "--no-dashboard", "--name", "w2"], cluster["logs"] / "w2.log")
    try:
        wait_for(lambda: _sized(client, ["w2"]), 60)
        caps, report = _sized(client, ["w2"])["w2"], _reports(client)["w2"]
        assert caps.limit_source == "host-share"
        expected = MEMORY_LIMIT - 2 * LIMIT_BYTES  # what the two 1 GiB workers on this host leave
        assert report["limit_bytes"] == expected and report["domain_workers"] == 3
        assert caps.memory_bytes == int(expected * wm.DEFAULT_SHARE) - report["idle_rss_bytes"]
        assert "host-share" in proc.log()  # logged as a warning
    finally:
        proc.kill_group()
    wait_for(lambda: "w2" not in {c.name for c in wm.read_capacities(client)}, 30)


def _holder():
    """A heavy task: hold ``nbytes`` for ``seconds``; returns (worker name, start, stop).

    Defined inside a function so it ships by value (the scheduler cannot import tests)."""
    def hold(nbytes, seconds):
        import time as clock

        from distributed import get_worker

        start = clock.time()
        block = bytearray(nbytes)
        clock.sleep(seconds)
        del block
        return get_worker().name, start, clock.time()

    return hold


def test_heavy_tasks_never_share_a_worker_past_its_budget(cluster):
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w0", "w1"]), 60)
    caps = wm.read_capacities(client)
    peak = max(c.memory_bytes for c in caps) // 2 + 1  # two of them exceed any worker's share
    resources = wm.task_resources(peak, caps)
    assert set(resources) == {wm.MEMORY_BYTES, wm.WORKER_TOKEN}
    futures = [client.submit(_holder(), 200 * 2**20, 0.4, resources=resources, pure=False) for _ in range(6)]
    runs = client.gather(futures)
    by_worker: dict[str, list] = {}
    for name, start, stop in runs:
        by_worker.setdefault(name, []).append((start, stop))
    for intervals in by_worker.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:])), intervals
    assert sum(len(v) for v in by_worker.values()) == 6


def test_a_task_alone_excludes_every_other_task_of_ours(cluster):
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w0", "w1"]), 60)
    caps = wm.read_capacities(client)
    w0 = next(c for c in caps if c.name == "w0")
    alone = wm.task_resources(w0.solo_bytes, [w0])  # too big to share: runs alone
    small = wm.task_resources(1, caps)
    assert alone == {wm.SOLO_BYTES: float(w0.solo_bytes), wm.WORKER_TOKEN: 1.0}
    futures = [client.submit(_holder(), 1, 0.6, resources=alone, workers=[w0.address], pure=False)]
    futures += [client.submit(_holder(), 1, 0.2, resources=small, workers=[w0.address], pure=False) for _ in range(3)]
    (_, a_start, a_stop), *others = client.gather(futures)
    assert all(stop <= a_start or start >= a_stop for _, start, stop in others), (a_start, a_stop, others)


def test_a_task_waiting_while_no_worker_had_the_resources_runs_once_one_has(cluster):
    """Every worker dies at once (as in chaos.py's worker-kill); a task of ours submitted meanwhile
    is ``no-worker``. The restarted workers join before their plugin sets the resources, and Dask
    looks at ``no-worker`` tasks only when a worker joins: resource_sizing must start it."""
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w0", "w1"]), 60)
    old = set(client.scheduler_info()["workers"])
    for name in ("w0", "w1"):
        os.kill(_pid_of(client, name), signal.SIGKILL)
    wait_for(lambda: not old & set(client.scheduler_info()["workers"]), 30)
    future = client.submit(_holder(), 1, 0.0, resources=wm.task_resources(1, [_cap(2**20, 2**20)]), pure=False)
    name, _, _ = future.result(timeout=90)
    assert name in ("w0", "w1")
    assert not old & set(client.scheduler_info()["workers"])  # it ran on a restarted worker


def _used_on_scheduler(client, name: str) -> dict:
    def used(dask_scheduler, name=name):
        ws = next(w for w in dask_scheduler.workers.values() if str(w.name) == name)
        return dict(ws.used_resources)

    return client.run_on_scheduler(used)


def test_sizing_a_busy_worker_keeps_the_count_of_the_users_resources_in_use(cluster):
    """Dask's set_resources handler zeroes every used count of the worker; a user's task holding
    ``MEMORY`` is still running there. resource_sizing recounts them on the sizing event."""
    client = cluster["client"]
    wait_for(lambda: _sized(client, ["w1"]), 60)
    w1 = _address_of(client, "w1")
    holding = client.submit(_holder(), 1, 4.0, resources={"MEMORY": 1500}, workers=[w1], pure=False)
    wait_for(lambda: _used_on_scheduler(client, "w1").get("MEMORY") == 1500, 30)
    again = wm.ThrottlerMemoryPlugin()
    again.name = "throttler-memory-sized-again"  # a second plugin: setup runs now, on the busy worker
    sized_before = len(_reports_of(client, "w1"))
    client.register_plugin(again)
    wait_for(lambda: len(_reports_of(client, "w1")) > sized_before, 30)
    assert _used_on_scheduler(client, "w1")["MEMORY"] == 1500
    holding.result(timeout=30)
    wait_for(lambda: _used_on_scheduler(client, "w1").get("MEMORY") == 0, 30)
    client.unregister_worker_plugin(again.name)


def _reports_of(client, name):
    return [m for _, m in client.get_events(wm.EVENT_TOPIC) if m["name"] == name]


# --------------------------------------------------------------------------- pure policy


def _cap(memory, solo, name="w"):
    return wm.WorkerCapacity(address=name, name=name, memory_limit_bytes=0, memory_bytes=memory, solo_bytes=solo)


def test_task_resources_shares_then_runs_alone_then_refuses():
    workers = [_cap(600, 750, "a"), _cap(300, 400, "b")]
    assert wm.task_resources(500, workers) == {wm.MEMORY_BYTES: 500.0, wm.WORKER_TOKEN: wm.SHARED_TOKEN}
    assert wm.task_resources(700, workers) == {wm.SOLO_BYTES: 700.0, wm.WORKER_TOKEN: 1.0}
    assert wm.task_resources(10, workers, alone=True) == {wm.SOLO_BYTES: 10.0, wm.WORKER_TOKEN: 1.0}
    with pytest.raises(wm.NoWorkerFits) as info:
        wm.task_resources(751, workers)
    assert info.value.largest_solo_bytes == 750
    with pytest.raises(wm.NoWorkerFits):
        wm.task_resources(1, [_cap(0, 0)])  # workers not sized yet fit nothing


def test_worker_sizing_subtracts_the_idle_worker():
    s = wm.worker_sizing(1000, "memory_limit", 100, 0.6, 0.8)
    assert (s.memory_bytes, s.solo_bytes) == (500, 650)
    assert wm.worker_sizing(1000, "memory_limit", 100, 0.6, False).solo_bytes == 650  # pause disabled
    assert wm.worker_sizing(1000, "memory_limit", 100, 0.9, 0.8).memory_bytes == 650  # never above solo


def test_workers_whose_limits_overcommit_their_host_are_sized_to_their_share(tmp_path):
    """``dask worker --nworkers 2`` with each worker's limit at 3/4 of the host (as ``--nthreads``
    past the host's cores gives the whole host to each), then a third such worker joining later:
    every one of them is sized from its share of the host, the two already there sized again."""
    from distributed.system import MEMORY_LIMIT

    each = MEMORY_LIMIT * 3 // 4
    with _plain_cluster(tmp_path, lambda address: [Proc(
            ["dask", "worker", address, "--nworkers", "2", "--nthreads", "2", "--memory-limit", str(each),
             "--no-dashboard", "--name", "pair"], tmp_path / "pair.log")]) as (client, address, procs):
        pair = sorted(w["name"] for w in client.scheduler_info()["workers"].values())

        def sized_as(names, n_workers):
            reports = _reports(client)
            return all(n in reports and reports[n]["domain_workers"] == n_workers for n in names) and \
                _sized(client, names)
        wait_for(lambda: sized_as(pair, 2), 30)
        _assert_capped(client, pair, each * MEMORY_LIMIT // (2 * each), MEMORY_LIMIT)

        procs.append(Proc(["dask", "worker", address, "--nthreads", "2", "--memory-limit", str(each),
                           "--no-dashboard", "--name", "late"], tmp_path / "late.log"))
        wait_for(lambda: sized_as([*pair, "late"], 3), 60)
        _assert_capped(client, [*pair, "late"], each * MEMORY_LIMIT // (3 * each), MEMORY_LIMIT)
        assert "host-capped" in procs[1].log()  # the pair logged their new sizing as a warning


def _assert_capped(client, names, limit_bytes, host_bytes):
    from throttler.cluster.scheduler import read_snapshot
    from throttler.ops.status import StatusReporter

    caps, reports = _sized(client, names), _reports(client)
    snapshot = read_snapshot(client)
    views = {w.name: w for w in snapshot.workers}
    status = StatusReporter(service=None)
    status.observe_snapshot(snapshot)
    assert status.workers_host_capped() == {  # the status file's and the metric's list
        views[n].address: {"memory_limit_bytes": host_bytes * 3 // 4, "sized_limit_bytes": limit_bytes}
        for n in names}
    for name in names:
        assert views[name].budget_limit_bytes == limit_bytes  # what admission counts
        assert reports[name]["limit_bytes"] == limit_bytes
        assert reports[name]["own_limit_bytes"] == host_bytes * 3 // 4
        assert caps[name].limit_source == "host-capped"
        assert caps[name].memory_bytes == int(limit_bytes * wm.DEFAULT_SHARE) - reports[name]["idle_rss_bytes"]
    assert sum(caps[n].memory_bytes for n in names) <= host_bytes * wm.DEFAULT_SHARE  # what the host holds


def code_each_worker_holds(client) -> dict[str, int]:
    """What each worker's numba costs it, by whether it compiled throttler's loops or loaded them from
    numba's cache (the first worker of a fresh installation compiles them)."""
    from throttler.cluster.snapshot import NUMBA_COMPILED_BYTES, NUMBA_RESIDENT_BYTES, numba_compiled_here

    return {a: NUMBA_COMPILED_BYTES if compiled else NUMBA_RESIDENT_BYTES
            for a, compiled in client.run(numba_compiled_here).items()}


def test_a_large_joining_worker_loads_numba_at_the_probe_and_is_sized_without_it():
    """Workers of 3.2 GB: the daemon's package probe loads numba there (112 MiB from numba's cache,
    144 MiB compiled there: under the 5% margin either way), and within a second or two each reports
    that code and has both budgets lowered by it."""
    from throttler.cluster.embedded import start_embedded_cluster
    from throttler.cluster.scheduler import read_snapshot
    from throttler.cluster.snapshot import NUMBA_PRELOAD_MIN_LIMIT_BYTES
    from throttler.cluster.workers import worker_package_reports

    limit_bytes = 3_200_000_000
    assert limit_bytes >= NUMBA_PRELOAD_MIN_LIMIT_BYTES
    cluster, client = start_embedded_cluster(memory_limit_bytes=limit_bytes, n_workers=2, threads_per_worker=1)
    try:
        wm.register(client)

        def budgets() -> dict[str, tuple[int, int, int]]:
            return {w.address: (w.memory_budget_bytes, w.solo_budget_bytes, w.resident_code_bytes)
                    for w in read_snapshot(client).workers}

        wait_for(lambda: all(b[0] for b in budgets().values()), 30)
        before = budgets()
        assert all(code == 0 for _, _, code in before.values())
        reports = worker_package_reports(client, list(before))
        assert all(r["error"] is None for r in reports.values()), reports
        assert all(client.run(lambda: "numba" in __import__("sys").modules).values())
        code = code_each_worker_holds(client)
        after = {a: (m - code[a], s - code[a], code[a]) for a, (m, s, _) in before.items()}
        wait_for(lambda: budgets() == after, 30)
    finally:
        client.close()
        cluster.close()

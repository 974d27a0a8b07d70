"""Reading the scheduler, against a real LocalCluster of worker processes."""

from __future__ import annotations

import time

import cloudpickle
import pytest

from throttler.cluster import worker_memory
from throttler.cluster.embedded import default_worker_layout, start_embedded_cluster
from throttler.cluster.scheduler import _scheduler_worker_records, read_snapshot
from throttler.cluster.snapshot import (
    WORKER_BASELINE_BYTES,
    ClusterShape,
    ClusterSnapshot,
    WorkerView,
)

GiB = 2**30
MiB = 2**20


@pytest.fixture(scope="module")
def cluster_client():
    cluster, client = start_embedded_cluster(memory_limit_bytes=1 * GiB, n_workers=2, threads_per_worker=1)
    client.wait_for_workers(2, timeout=30)
    worker_memory.register(client)  # as the service does: the daemon's own resources on every worker
    yield cluster, client
    client.close()
    cluster.close()


def wait_for(client, predicate, timeout_seconds=8.0):
    """Poll read_snapshot until predicate(snapshot) holds; returns that snapshot."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        snapshot = read_snapshot(client)
        if predicate(snapshot) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.02)


# --------------------------------------------------------------------------- real cluster


def test_snapshot_reads_limits_status_and_resources(cluster_client):
    _, client = cluster_client
    sized = {msg["worker"]: msg for _, msg in client.get_events(worker_memory.EVENT_TOPIC)}
    before = time.monotonic()
    snapshot = read_snapshot(client)
    assert before <= snapshot.taken_at_seconds <= time.monotonic()
    assert len(snapshot.workers) == 2
    for w in snapshot.workers:
        assert w.status == "running" and w.is_running
        assert w.nthreads == 1
        assert w.memory_limit_bytes == 1 * GiB
        assert w.memory_budget_bytes == sized[w.address]["memory_bytes"]  # as the worker plugin sized it
        assert w.solo_budget_bytes == sized[w.address]["solo_bytes"]
        assert w.used_budget_bytes == 0.0
        assert 10 * MiB < w.process_bytes < 1 * GiB
        assert 0 <= w.unmanaged_old_bytes <= w.process_bytes
        assert w.address.startswith("tcp://")
    budgets = tuple(sized[w.address]["memory_bytes"] for w in snapshot.workers)
    solos = tuple(sized[w.address]["solo_bytes"] for w in snapshot.workers)
    assert snapshot.shape() == ClusterShape(2, (GiB, GiB), (1, 1), budgets, solos)
    assert snapshot.total_threads == 2


def test_snapshot_sees_a_task_holding_the_memory_resource(cluster_client):
    from distributed import Event

    _, client = cluster_client
    hold = Event("throttler-test-hold", client=client)

    def held(n):
        Event("throttler-test-hold").wait(timeout=10)
        return n

    future = client.submit(held, 1, resources={worker_memory.MEMORY_BYTES: 300 * MiB,
                                               worker_memory.WORKER_TOKEN: worker_memory.SHARED_TOKEN}, pure=False)
    try:
        seen = wait_for(client, lambda s: sum(w.used_budget_bytes for w in s.workers) > 0)
        assert sorted(w.used_budget_bytes for w in seen.workers) == [0.0, float(300 * MiB)]
    finally:
        hold.set()
    assert future.result(timeout=10) == 1
    done = wait_for(client, lambda s: all(w.used_budget_bytes == 0 for w in s.workers))
    assert all(w.used_budget_bytes == 0 for w in done.workers)


def test_snapshot_sees_managed_memory_at_once(cluster_client):
    _, client = cluster_client
    future = client.submit(lambda: b"x" * (50 * MiB), pure=False)
    future.result(timeout=10)
    try:
        seen = wait_for(client, lambda s: sum(w.managed_bytes for w in s.workers) >= 50 * MiB)
        assert sum(w.managed_bytes for w in seen.workers) >= 50 * MiB
    finally:
        future.release()


def test_snapshot_sees_a_paused_worker(cluster_client):
    _, client = cluster_client

    def set_status(dask_worker, name):
        """Pause or resume; while paused, the memory monitor must not resume it on its own."""
        from distributed.core import Status
        manager = dask_worker.memory_manager
        if name == "paused":
            manager._saved_pause_fraction = manager.memory_pause_fraction
            manager.memory_pause_fraction = False
        else:
            manager.memory_pause_fraction = getattr(manager, "_saved_pause_fraction", 0.8)
        dask_worker.status = Status[name]

    address = read_snapshot(client).workers[0].address
    client.run(set_status, name="paused", workers=[address])
    try:
        paused = wait_for(client, lambda s: any(w.status == "paused" for w in s.workers))
        assert [w.status for w in paused.workers if w.address == address] == ["paused"]
        assert len(paused.running_workers) == 1
        assert paused.shape().n_workers == 2  # a paused worker still belongs to the shape
    finally:
        client.run(set_status, name="running", workers=[address])
    wait_for(client, lambda s: all(w.is_running for w in s.workers))


def _call_where_throttler_cannot_be_imported(tmp_path, function, call: str):
    """Pickle ``function`` (by value), then, in a fresh interpreter that refuses every
    ``throttler`` import, unpickle it as ``f`` and print ``eval(call)``; the finished process."""
    import subprocess
    import sys

    blob = tmp_path / "function.pickle"
    blob.write_bytes(cloudpickle.dumps(function))
    script = (
        "import sys, pickle, types\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'throttler':\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"f = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        f"print({call})\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_the_scheduler_function_ships_by_value(tmp_path):
    """A remote scheduler need not have throttler installed: the function unpickles and runs where
    throttler cannot be imported."""
    done = _call_where_throttler_cannot_be_imported(tmp_path, _scheduler_worker_records(),
                                                    "f(types.SimpleNamespace(workers={}, get_events=lambda topic: ()))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- pure values


def view(name, status="running", limit=GiB, threads=2, sized=True):
    return WorkerView(name, f"tcp://{name}:1", status, threads, limit, 100, 0, 100,
                      limit // 2 if sized else 0, limit * 3 // 4 if sized else 0)


def test_shape_keeps_running_and_paused_workers_only():
    snapshot = ClusterSnapshot((view("a"), view("b", "paused", 2 * GiB), view("c", "closing")), 1.0)
    shape = snapshot.shape()
    assert shape.n_workers == 2
    assert shape.memory_limit_bytes == (GiB, 2 * GiB)
    assert shape.largest_memory_limit_bytes == 2 * GiB
    assert shape.total_threads == 4
    assert shape.task_budget_bytes(0.5) == GiB  # the plugin's budgets: limit // 2 in view()
    assert shape.cluster_budget_bytes(0.5) == 3 * GiB // 2
    assert shape.solo_task_budget_bytes() == 3 * GiB // 2
    unsized = ClusterShape(2, (GiB, 2 * GiB), (2, 2))
    assert unsized.task_budget_bytes(0.5) == GiB - WORKER_BASELINE_BYTES
    assert unsized.cluster_budget_bytes(0.5) == 3 * GiB // 2 - 2 * WORKER_BASELINE_BYTES
    assert ClusterShape.uniform(1, 100 * MiB).task_budget_bytes(0.6) == 0
    assert snapshot.process_bytes == 100  # running workers only


def test_shape_takes_the_plugin_budgets_only_when_every_worker_is_sized():
    sized = ClusterSnapshot((view("a"), view("b", limit=2 * GiB)), 0.0).shape()
    assert sized.memory_budget_bytes == (GiB // 2, GiB) and sized.solo_budget_bytes == (3 * GiB // 4, 3 * GiB // 2)
    half = ClusterSnapshot((view("a"), view("b", sized=False)), 0.0).shape()
    assert half.memory_budget_bytes == () and half.solo_budget_bytes == ()  # derived from the limits
    assert half.task_budget_bytes(0.6) == int(GiB * 0.6) - WORKER_BASELINE_BYTES
    assert half.solo_task_budget_bytes() == int(GiB * 0.75) - WORKER_BASELINE_BYTES


def test_shape_validates_its_tuples():
    with pytest.raises(ValueError):
        ClusterShape(2, (GiB,), (1, 1))


def test_concurrency_is_threads_limited_by_the_daemon_budgets():
    shape = ClusterShape(2, (4 * GiB, 1 * GiB), (4, 4), (2 * GiB, 512 * MiB), (3 * GiB, 700 * MiB))
    assert shape.concurrent_tasks(1 * GiB) == 2 + 0
    assert shape.concurrent_tasks(512 * MiB) == 4 + 1
    assert shape.concurrent_tasks(int(2.5 * GiB)) == 1  # shares no worker: alone, on the one whose solo budget holds it
    assert shape.concurrent_tasks(10) == 8


def test_default_layout_is_one_single_threaded_worker_per_core(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"total": 10 * GiB})())
    assert default_worker_layout() == (2, 1, int(10 * GiB * 0.8 / 2))
    assert default_worker_layout(4, 2, GiB) == (4, 2, GiB)


# ------------------------------------------------------------------ workers' packages


def test_package_problem_names_each_way_a_worker_can_be_wrong():
    from throttler.cluster.workers import package_problem

    assert package_problem("1.2.0", {"version": "1.2.0", "error": None}) is None
    assert package_problem("1.2.0", {"version": "1.1.9", "error": None}) == \
        "dask-throttler 1.1.9 is installed there; this daemon runs 1.2.0"
    assert "not installed there" in package_problem("1.2.0", {"version": None, "error": None})
    broken = package_problem("1.2.0", {"version": "1.2.0", "error": "ImportError: no pyarrow"})
    assert "installed but its worker modules fail: ImportError: no pyarrow" in broken
    # A worker of another version is reported as such, whatever its modules do.
    assert package_problem("1.2.0", {"version": "1.1.9", "error": "ImportError: no module page_checks"}) == \
        "dask-throttler 1.1.9 is installed there; this daemon runs 1.2.0"
    assert "check failed there: OSError: timed out" in package_problem("1.2.0", OSError("timed out"))
    assert "returned None" in package_problem("1.2.0", None)


def test_package_probe_runs_on_real_workers_and_reports_this_version(cluster_client):
    from throttler import __version__
    from throttler.cluster.workers import worker_package_reports

    _cluster, client = cluster_client
    workers = sorted(client.scheduler_info()["workers"])
    reports = worker_package_reports(client, workers)
    assert reports == {w: {"version": __version__, "error": None} for w in workers}
    assert all(client.run(lambda: "throttler.worker.kernels" in __import__("sys").modules).values())


def test_package_probe_runs_where_throttler_cannot_be_imported(tmp_path):
    """Shipped by value, the probe runs in a process that cannot import throttler and says why."""
    from throttler.cluster.workers import worker_package_probe

    done = _call_where_throttler_cannot_be_imported(tmp_path, worker_package_probe(), "f()")
    assert done.returncode == 0, done.stderr
    assert "'error': 'importing throttler.worker.kernels: ImportError: blocked for the test: throttler'" in done.stdout, \
        done.stdout


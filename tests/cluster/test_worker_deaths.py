"""Worker deaths classified from distributed's own signals, on a real ``dask scheduler``
(that cannot import throttler) and real ``dask worker`` processes with nannies."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.conftest import wait_for
from tests.helpers.daemon import Proc, free_port
from throttler.cluster import worker_deaths as wd

#: The scheduler runs with throttler made unimportable: the plugin must arrive by value.
NO_THROTTLER_SCHEDULER = """
import sys
class _NoThrottler:
    def find_spec(self, name, path=None, target=None):
        if name == "throttler" or name.startswith("throttler."):
            raise ImportError("throttler is not installed on this scheduler")
sys.meta_path.insert(0, _NoThrottler())
from distributed.cli.dask_scheduler import main
main()
"""

SMALL_LIMIT_BYTES = 400 * 2**20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):

    logs = tmp_path_factory.mktemp("deaths-cluster")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}  # one death fails the task: no reruns
    procs = {"scheduler": Proc([sys.executable, "-c", NO_THROTTLER_SCHEDULER, "--host", "127.0.0.1",
                                "--port", str(port), "--no-dashboard"], logs / "scheduler.log", env=env)}
    for name, limit in (("small", SMALL_LIMIT_BYTES), ("victim", 2**30), ("leaver", 2**30)):
        procs[name] = Proc(["dask", "worker", address, "--nthreads", "1", "--memory-limit", str(limit),
                            "--no-dashboard", "--name", name], logs / f"{name}.log")
    client = None
    try:
        client = _connect(address, procs)
        client.wait_for_workers(3, timeout=60)
        wd.register(client)
        yield {"client": client, "procs": procs}
    finally:
        if client is not None:
            client.close()
        for p in reversed(list(procs.values())):
            p.kill_group()


def _connect(address, procs):
    from distributed import Client

    for _ in range(300):
        try:
            return Client(address, timeout="1s")
        except OSError:
            assert procs["scheduler"].popen.poll() is None, procs["scheduler"].log()
    raise AssertionError("scheduler not reachable")


def _address_of(client, name) -> str:
    return next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == name)


def _tasks():
    """Task functions shipped by value (the scheduler and workers cannot import tests)."""
    def grow(step_bytes):
        import time

        import numpy as np

        held = []
        while True:  # until the nanny terminates the worker
            held.append(np.ones(step_bytes // 8))
            time.sleep(0.02)

    def park(marker):
        import pathlib
        import time

        pathlib.Path(marker).touch()
        time.sleep(600)

    return grow, park


def _death_of(client, address) -> wd.Death | None:
    return next((d for d in wd.fetch_deaths(client) if d.address == address), None)


def test_the_plugin_reached_a_scheduler_without_throttler(cluster):
    assert "throttler-worker-deaths" in cluster["client"].run_on_scheduler(lambda dask_scheduler:
                                                                           list(dask_scheduler.plugins))


def test_a_nanny_memory_kill_is_memory_with_the_tasks_key(cluster):
    client = cluster["client"]
    grow, _ = _tasks()
    address = _address_of(client, "small")
    key = "throttler-groupby-abc123-combine-1-0"
    future = client.submit(grow, 20 * 2**20, key=key, workers=[address], allow_other_workers=False)
    wait_for(lambda: future.status == "error", 90)
    wait_for(lambda: (d := _death_of(client, address)) is not None and d.cause == "memory", 30)
    death = _death_of(client, address)
    assert (death.name, death.processing_keys, death.memory_limit_bytes) == ("small", (key,), SMALL_LIMIT_BYTES)
    assert death.memory_bytes > 0.95 * SMALL_LIMIT_BYTES  # the nanny's reading at the kill
    found = wd.group_memory_death(wd.fetch_deaths(client), "throttler-groupby-abc123-")
    assert found is not None and found.group_keys == (key,) and found.sole_suspect
    assert wd.group_memory_death(wd.fetch_deaths(client), "throttler-sum-other-") is None


def test_an_operator_sigkill_is_other(cluster, tmp_path):
    client = cluster["client"]
    _, park = _tasks()
    address = _address_of(client, "victim")
    marker = tmp_path / "parked"
    key = "throttler-sum-def456-leaf-0"
    parked = client.submit(park, str(marker), key=key, workers=[address], allow_other_workers=False)
    wait_for(lambda: marker.exists(), 30)
    pid = next(iter(client.run(os.getpid, workers=[address]).values()))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _death_of(client, address) is not None, 30)
    death = _death_of(client, address)
    assert (death.cause, death.name, death.processing_keys, death.expected) == ("other", "victim", (key,), False)
    assert death.memory_limit_bytes == 2**30
    assert wd.group_memory_death(wd.fetch_deaths(client), "throttler-sum-def456-") is None
    parked.cancel()


def test_a_graceful_close_is_other_and_expected(cluster):
    client = cluster["client"]
    address = _address_of(client, "leaver")
    cluster["procs"]["leaver"].signal(signal.SIGTERM)  # `dask worker` closes nanny and worker gracefully
    wait_for(lambda: _death_of(client, address) is not None, 30)
    death = _death_of(client, address)
    assert (death.cause, death.name, death.processing_keys) == ("other", "leaver", ())


# --------------------------------------------------------------------------- pure


def _remove(t, worker, keys, name="w"):
    return t, {"kind": "remove", "worker": worker, "name": name, "memory_bytes": 10, "memory_limit_bytes": 100,
               "processing_keys": list(keys), "stimulus_id": "s", "expected": False}


def _kill(t, worker, rss):
    return t, {"kind": "memory-kill", "worker": worker, "name": "w", "memory_bytes": 90, "memory_limit_bytes": 100,
               "rss_bytes": rss}


def test_classify_pairs_a_kill_with_its_removal_in_either_order():
    events = [_remove(10.0, "a", ["g1-leaf-0"]), _kill(10.2, "a", 97), _kill(20.0, "b", 96),
              _remove(20.1, "b", ["g1-leaf-1", "g2-leaf-0"]), _remove(30.0, "c", ["g1-final"]),
              _remove(500.0, "a", ["g1-leaf-2"])]  # the same address much later: not that kill
    deaths = wd.classify(events)
    assert [(d.address, d.cause, d.memory_bytes) for d in deaths] == [
        ("a", "memory", 97), ("b", "memory", 96), ("c", "other", 10), ("a", "other", 10)]
    found = wd.group_memory_death(deaths, "g1-")
    assert (found.death.address, found.group_keys, found.other_keys, found.sole_suspect) == (
        "b", ("g1-leaf-1",), ("g2-leaf-0",), False)
    assert wd.group_memory_death(deaths, "g3-") is None

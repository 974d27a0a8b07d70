"""What the status file says while the daemon drains (Service.drain), with a fake client and a fixed clock.

The main loop stops before the drain; the drain itself must keep the status file
fresh (``throttler status`` calls a daemon whose file is 15 s old dead) and say
that it is draining. No cluster: the running group is put in the service's jobs
directly and "finishes" when the test removes it.
"""

from __future__ import annotations

import threading
import time

from tests.conftest import wait_for
from throttler.commands.status import status_document, status_lines
from throttler.config import load
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.ops.status import read_status
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.planning.plan import Plan
from throttler.service.jobs import RUNNING, Job
from throttler.service.service import Service
from throttler.spool.queue import Spool
from throttler.worker.graphs import GroupGraph

NOW_SECONDS = 100.0
DRAIN_TIMEOUT_SECONDS = 30.0


class NoScheduler:
    """A client the drain must not call: reading the scheduler could outlast the drain's deadline."""

    def run_on_scheduler(self, fn):
        raise AssertionError("the drain read the scheduler")


def running_job(group: str) -> Job:
    job = Job(claim=None, group=group, requested_strategy="sum", priority=0, claimed_at_seconds=0.0,
              state=RUNNING, submitted_at_seconds=NOW_SECONDS - 5)
    job.plan = Plan(group, "sum", (), files_per_task=1, fan_in=8, task_peak_bytes=2**20,
                    group_peak_bytes=2**20, expansion=1.0)
    job.graph = GroupGraph(final=f"final-{group}", token=f"token-{group}", n_tasks=1, key_prefix=group)
    return job


def make_service(tmp_path) -> tuple[Service, Spool]:
    cfg = load(overrides={"spool": str(tmp_path / "spool"), "data_root": str(tmp_path), "output": str(tmp_path),
                          "metrics_address": None}, environ={})
    spool = Spool(cfg.spool).ensure()
    service = Service(cfg, NoScheduler(), spool=spool, catalog=Catalog(cfg.data_root, None), metrics=Metrics(),
                      estimator=Estimator(str(tmp_path / "estimator.json")), notifier=sdnotify,
                      clock=lambda: NOW_SECONDS)
    return service, spool


def test_the_status_file_is_rewritten_during_the_drain_and_says_it_drains(tmp_path):
    service, spool = make_service(tmp_path)
    assert service.status.document()["draining"] is None  # serving
    job = running_job("slow")
    service._jobs[job.group] = job
    drain = threading.Thread(target=service.drain, args=(DRAIN_TIMEOUT_SECONDS,), daemon=True)
    drain.start()
    try:
        wait_for(lambda: read_status(spool.state_dir) is not None, 5)
        first = read_status(spool.state_dir)
        assert first["draining"] == {"running_groups": 1, "deadline_in_seconds": 30.0}
        assert first["states"]["running"] == 1 and [r["group"] for r in first["running"]] == ["slow"]
        # rewritten while the group runs: a later file, not just the one written when the drain began
        wait_for(lambda: read_status(spool.state_dir)["updated_unix_seconds"] > first["updated_unix_seconds"], 5)

        doc = status_document(str(spool.root), time.time())
        assert doc["running"] is True and doc["not_running_reason"] is None
        lines = status_lines(doc, time.time())
        assert lines[1].startswith(f"daemon pid {first['pid']}: states ")
        assert lines[2] == "draining: 1 running group(s), deadline in 30 s"
    finally:
        with service._jobs_lock:  # the group finishes: the drain ends
            del service._jobs[job.group]
        drain.join(5)
    assert not drain.is_alive()


def test_a_daemon_that_died_draining_shows_it_as_last_known():
    daemon = {"pid": 7, "updated_unix_seconds": 50.0, "states": {"running": 2}, "workers": {"running": 1},
              "cluster_memory": {"limit_bytes": 3 * 2**30, "used_bytes": 2**30, "free_bytes": 2 * 2**30,
                                 "reserved_bytes": 2**29},
              "running": [], "draining": {"running_groups": 2, "deadline_in_seconds": 12.4}}
    doc = {"running": False, "not_running_reason": "its pid 7 is gone", "daemon": daemon,
           "queue": {"incoming": 0, "active": 2, "done": 0, "failed": 0}}
    assert status_lines(doc, 80.0)[:5] == [
        "throttler is not running (last seen 30 s ago, pid 7): its pid 7 is gone",
        "queue: incoming 0  active 2  done 0  failed 0",
        "last known daemon pid 7: states {'running': 2}; workers {'running': 1}",
        "last known draining: 2 running group(s), deadline in 12 s",
        "last known cluster memory (admission view): capacity 3.00 GiB (memory_fraction of the workers' limits), "
        "used 1.00 GiB, free 2.00 GiB, reserved 512.0 MiB"]

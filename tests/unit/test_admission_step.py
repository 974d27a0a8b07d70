"""One admission round of the service (Service.admit_step), driven with a fake client and a fixed clock.

No cluster: the fake client answers the scheduler read with fixed worker records
and records what is submitted. The waiting list is filled directly (today it is
``Submitter._waiting``).
"""

from __future__ import annotations

from throttler.cluster import worker_memory
from throttler.config import load
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.planning.plan import Plan
from throttler.service.jobs import RUNNING, WAITING, Job
from throttler.service.service import Service
from throttler.spool.queue import Spool
from throttler.worker.graphs import GroupGraph

GiB, MiB = 2**30, 2**20
NOW_SECONDS = 100.0


class FakeFuture:
    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, fn):
        self.callbacks.append(fn)


class FakeClient:
    """Two idle 4 GiB workers of one thread, sized by the daemon's worker plugin."""

    def __init__(self):
        self.submitted = []  #: (final, resources) per compute call

    def run_on_scheduler(self, fn):
        return [dict(name=f"w{i}", address=f"tcp://10.0.0.{i}:1", status="running", nthreads=1,
                     memory_limit_bytes=4 * GiB, process_bytes=200 * MiB, managed_bytes=0,
                     unmanaged_old_bytes=0, memory_budget_bytes=2 * GiB, solo_budget_bytes=3 * GiB,
                     processing=0) for i in range(2)]

    def compute(self, final, resources=None):
        self.submitted.append((final, resources))
        return FakeFuture()


def waiting_job(group: str, group_peak_bytes: int, waiting_since_seconds: float) -> Job:
    job = Job(claim=None, group=group, requested_strategy="sum", priority=0, claimed_at_seconds=0.0,
              state=WAITING, waiting_since_seconds=waiting_since_seconds)
    job.plan = Plan(group, "sum", (), files_per_task=1, fan_in=8, task_peak_bytes=512 * MiB,
                    group_peak_bytes=group_peak_bytes, expansion=1.0)
    job.graph = GroupGraph(final=f"final-{group}", token=f"token-{group}", n_tasks=1, key_prefix=group)
    return job


def test_one_round_submits_what_fits_in_queue_order_and_leaves_the_rest_waiting(tmp_path):
    cfg = load(overrides={"spool": str(tmp_path / "spool"), "data_root": str(tmp_path), "output": str(tmp_path),
                          "metrics_address": None}, environ={})
    spool, metrics, client = Spool(cfg.spool).ensure(), Metrics(), FakeClient()
    service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, None), metrics=metrics,
                      estimator=Estimator(str(tmp_path / "estimator.json")), notifier=sdnotify,
                      clock=lambda: NOW_SECONDS)
    a, b, c = waiting_job("a", 1 * GiB, 90.0), waiting_job("b", 3 * GiB, 95.0), waiting_job("c", 2 * GiB, 99.0)
    service.submitter._waiting.extend([a, b, c])
    service.status.shape()  # the first snapshot starts its workers' first check, which admission waits for
    service.status.wait_for_checks(10)  # (the fake client has no run(): the check gives up at once)

    # capacity 2 x 4 GiB x 0.6 = 4.8 GiB; used: each idle worker's 144 MiB baseline -> 4.52 GiB free:
    # a (1 GiB) and b (3 GiB) fit in turn, c (2 GiB) then waits for memory
    assert service.admit_step() is True
    memory = {worker_memory.MEMORY_BYTES: float(512 * MiB),  # the task peak: it shares its worker
              worker_memory.WORKER_TOKEN: worker_memory.SHARED_TOKEN}
    assert client.submitted == [("final-a", memory), ("final-b", memory)]
    assert service.submitter._waiting == [c]
    assert sorted(r.key for r in service.ledger.items()) == ["token-a", "token-b"]
    assert service.ledger.total_bytes() == 4 * GiB
    assert [(j.state, j.reservation_key, j.admission_wait_seconds, j.submitted_at_seconds) for j in (a, b)] == [
        (RUNNING, "token-a", 10.0, NOW_SECONDS), (RUNNING, "token-b", 5.0, NOW_SECONDS)]
    assert (c.state, c.reservation_key) == (WAITING, None)
    sample = metrics.registry.get_sample_value
    assert (sample("throttler_admission_wait_seconds_count"), sample("throttler_admission_wait_seconds_sum")) == \
        (2.0, 15.0)

    # a second round at the same instant: nothing changed, nothing more is submitted
    assert service.admit_step() is False
    assert len(client.submitted) == 2 and service.submitter._waiting == [c]

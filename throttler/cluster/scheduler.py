"""Scheduler I/O: reading worker state from the scheduler, and the restrictions tasks are submitted with."""

from __future__ import annotations

import time
from typing import Any, Callable

from throttler.cluster import worker_memory
from throttler.cluster.snapshot import RESIDENT_CODE_METRIC, ClusterSnapshot, WorkerView
from throttler.errors import DoesNotFit


def task_restriction(task_peak_bytes: int, alone: bool, snapshot: ClusterSnapshot,
                     memory_fraction: float) -> dict[str, float]:
    """The ``resources=`` of a submission whose largest task peaks at ``task_peak_bytes``.

    Expressed in the daemon's own worker resources (:mod:`throttler.cluster.worker_memory`):
    shared, or alone on its worker when ``alone`` or when no worker can share it.
    Raises ``NoWorkerFits`` when no running worker could hold it even alone.
    """
    capacities = [worker_memory.WorkerCapacity(w.address, w.name, w.memory_limit_bytes,
                                               w.shared_budget(memory_fraction), w.solo_budget())
                  for w in snapshot.running_workers]
    try:
        return worker_memory.task_resources(task_peak_bytes, capacities, alone)
    except worker_memory.NoWorkerFits as exc:
        raise DoesNotFit(str(exc)) from None


def read_snapshot(client: Any, clock: Callable[[], float] = time.monotonic) -> ClusterSnapshot:
    """Read every worker's state from the scheduler (one round trip)."""
    records = client.run_on_scheduler(_scheduler_worker_records())
    workers = tuple(WorkerView(**r) for r in sorted(records, key=lambda r: r["name"]))
    return ClusterSnapshot(workers=workers, taken_at_seconds=clock())


def _scheduler_worker_records() -> Callable:
    """The function run on the scheduler.

    It is defined inside this function so cloudpickle ships it by value: a
    remote scheduler need not have throttler installed. It uses no globals
    and returns plain dicts.
    """

    memory_key, solo_key, topic = worker_memory.MEMORY_BYTES, worker_memory.SOLO_BYTES, worker_memory.EVENT_TOPIC
    code_key = RESIDENT_CODE_METRIC

    def collect(dask_scheduler) -> list[dict]:
        sized = {}  # each worker's latest sizing event: the limit its budgets came from
        for _, msg in dask_scheduler.get_events(topic):
            sized[msg.get("worker")] = int(msg.get("limit_bytes", 0) or 0)
        records = []
        for ws in dask_scheduler.workers.values():
            try:
                mem = ws.memory
                process, managed, old = int(mem.process), int(mem.managed), int(mem.unmanaged_old)
            except (KeyError, TypeError, AttributeError):  # no heartbeat metrics yet
                process = managed = old = 0
            resources, used = ws.resources or {}, ws.used_resources or {}
            records.append(dict(
                name=str(ws.name), address=ws.address,
                status=getattr(ws.status, "name", str(ws.status)),
                nthreads=int(ws.nthreads), memory_limit_bytes=int(ws.memory_limit or 0),
                process_bytes=process, managed_bytes=managed, unmanaged_old_bytes=old,
                memory_budget_bytes=int(resources.get(memory_key, 0)),
                solo_budget_bytes=int(resources.get(solo_key, 0)),
                used_budget_bytes=float(used.get(memory_key, 0.0)),
                processing=len(ws.processing),
                sized_limit_bytes=sized.get(ws.address, 0),
                resident_code_bytes=int((getattr(ws, "metrics", None) or {}).get(code_key, 0) or 0),
            ))
        return records

    return collect


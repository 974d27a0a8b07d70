"""Scheduler I/O: reading worker state from the scheduler, task restrictions."""

from __future__ import annotations

import time
from typing import Any, Callable

from throttler.cluster.snapshot import ClusterSnapshot, WorkerView

#: The worker resource that admission restrictions are expressed in (bytes).
MEMORY_RESOURCE = "MEMORY"


def memory_restriction(task_peak_bytes: int, snapshot: ClusterSnapshot) -> dict | None:
    """The per-task ``resources`` to submit with, or None when no running worker
    declares MEMORY (then a restriction would leave tasks waiting forever).

    Never more than the largest declaration, so every task can run somewhere.
    """
    declared = [w.memory_resource for w in snapshot.running_workers if w.memory_resource]
    if not declared:
        return None
    return {MEMORY_RESOURCE: min(float(task_peak_bytes), max(declared))}


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

    def collect(dask_scheduler) -> list[dict]:
        records = []
        for ws in dask_scheduler.workers.values():
            try:
                mem = ws.memory
                process, managed, old = int(mem.process), int(mem.managed), int(mem.unmanaged_old)
            except (KeyError, TypeError, AttributeError):  # no heartbeat metrics yet
                process = managed = old = 0
            declared = (ws.resources or {}).get("MEMORY")
            records.append(dict(
                name=str(ws.name), address=ws.address,
                status=getattr(ws.status, "name", str(ws.status)),
                nthreads=int(ws.nthreads), memory_limit_bytes=int(ws.memory_limit or 0),
                process_bytes=process, managed_bytes=managed, unmanaged_old_bytes=old,
                memory_resource=None if declared is None else float(declared),
                used_memory_resource=float((ws.used_resources or {}).get("MEMORY", 0.0)),
                processing=len(ws.processing),
            ))
        return records

    return collect

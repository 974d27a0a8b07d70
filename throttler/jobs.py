"""One group's journey through the daemon, and the records it ends with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from throttler.plan import Plan

QUEUED, PLANNING, WAITING, RUNNING = "queued", "planning", "waiting", "running"
STATES = (QUEUED, PLANNING, WAITING, RUNNING)


@dataclass(eq=False)
class Job:
    """A claimed run of one group, from claim to record."""

    claim: Any  #: the spool's Claim
    group: str
    requested_strategy: str
    priority: int
    claimed_at_seconds: float  #: monotonic
    state: str = QUEUED
    attempt: int = 1
    memory_failures: int = 0  #: attempts that killed a worker: only these make the planner more careful
    strategy_override: str | None = None  #: "sum" after aligned found misaligned keys
    plan: Plan | None = None
    graph: Any = None
    future: Any = None
    reservation_key: str | None = None
    not_before_seconds: float = 0.0  #: backoff: do not admit before this monotonic time
    waiting_since_seconds: float = 0.0
    admission_wait_seconds: float = 0.0
    submitted_at_seconds: float = 0.0
    run_seconds: float = 0.0
    history: list[str] = field(default_factory=list)  #: one line per failed attempt
    requests_counted: int = 0  #: request files already counted in the metrics

    @property
    def strategy(self) -> str:
        return self.strategy_override or self.requested_strategy


def worker_peak_fraction(summary: dict) -> float | None:
    """The highest worker peak RSS over its memory limit among the group's tasks (None: not measured)."""
    rss, limit = summary.get("worker_peak_rss_bytes"), summary.get("worker_memory_limit_bytes")
    return round(rss / limit, 4) if rss and limit else None


def done_record(job: Job, summary: dict) -> dict:
    """The ``done/`` record: what was produced, what it cost, how it went."""
    plan = job.plan
    return {
        "group": job.group,
        "output": summary["output"],
        "rows": summary["rows"],
        "files": summary["files"],
        "bytes": summary["bytes_read"],
        "bytes_written": summary["bytes_written"],
        "nan_count": summary["nan_count"],
        "strategy": plan.strategy,
        "requested_strategy": job.requested_strategy,
        "estimate_bytes": plan.group_peak_bytes,
        "task_estimate_bytes": plan.task_peak_bytes,
        "observed_peak_bytes": summary["peak_bytes"],
        "worker_peak_rss_bytes": summary.get("worker_peak_rss_bytes") or None,
        "worker_peak_fraction": worker_peak_fraction(summary),
        "files_per_task": plan.files_per_task,
        "leaf_tasks": plan.n_leaf_tasks,
        "admission_wait_seconds": round(job.admission_wait_seconds, 6),
        "claim_to_submit_seconds": round(job.submitted_at_seconds - job.claimed_at_seconds, 6),
        "seconds": round(job.run_seconds, 6),
        "task_seconds": summary["task_seconds"],
        "total_seconds": round(time.monotonic() - job.claimed_at_seconds, 6),
        "attempts": job.attempt,
        "history": job.history,
    }


def failed_record(job: Job, reason: str, error_class: str) -> dict:
    """The ``failed/`` record: the group, the request(s) and a clear reason."""
    plan = job.plan
    return {
        "group": job.group,
        "request": job.claim.requests[0] if job.claim.requests else None,
        "reason": reason,
        "error": error_class,
        "strategy": plan.strategy if plan else job.strategy,
        "estimate_bytes": plan.group_peak_bytes if plan else None,
        "attempts": job.attempt,
        "history": job.history,
        "total_seconds": round(time.monotonic() - job.claimed_at_seconds, 6),
    }

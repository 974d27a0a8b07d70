"""The done/ and failed/ records a group's run ends with."""

from __future__ import annotations

import time

from throttler.service.jobs import Job
from throttler.worker.peakrss import PeakReading


def worker_peak_fraction(summary: dict) -> float | None:
    """The highest worker peak RSS over its memory limit among the group's tasks (None: not measured)."""
    rss, limit = summary.get("worker_peak_rss_bytes"), summary.get("worker_memory_limit_bytes")
    return round(rss / limit, 4) if rss and limit else None


def worker_peak_rise_bytes(summary: dict) -> int | None:
    """How far that worker's RSS rose during the task (its peak less its RSS at the task's start)."""
    return PeakReading(summary.get("worker_peak_rss_bytes") or 0,
                       start_bytes=summary.get("worker_start_rss_bytes") or 0).rise_bytes


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
        "fell_back": job.strategy_override is not None,
        "estimate_bytes": plan.group_peak_bytes,
        "task_estimate_bytes": plan.task_peak_bytes,
        "observed_peak_bytes": summary["peak_bytes"],
        "worker_peak_rss_bytes": summary.get("worker_peak_rss_bytes") or None,
        "worker_peak_fraction": worker_peak_fraction(summary),
        "worker_peak_rise_bytes": worker_peak_rise_bytes(summary),
        "files_per_task": plan.files_per_task,
        "leaf_tasks": plan.n_leaf_tasks,
        "admission_wait_seconds": round(job.admission_wait_seconds, 6),
        "claim_to_submit_seconds": round(job.submitted_at_seconds - job.claimed_at_seconds, 6),
        "seconds": round(job.run_seconds, 6),
        "task_seconds": summary["task_seconds"],
        "total_seconds": round(time.monotonic() - job.claimed_at_seconds, 6),
        "attempts": job.attempt,
        "history": job.history,
        **(job.run.record_fields() if job.run is not None else {}),
    }


def unchanged_record(job: Job) -> dict:
    """The ``done/`` record of a run that found nothing new or changed: nothing read, nothing
    written, the previous output (``output``) is the sum over the group's files as they are."""
    return {
        "group": job.group,
        "output": str(job.run.target),
        "rows": job.run.previous_rows,
        "files": job.run.group_files,
        "bytes": 0,
        "bytes_written": 0,
        "nan_count": 0,  # no value read
        "strategy": "none",
        "requested_strategy": job.requested_strategy,
        "fell_back": False,
        "seconds": 0.0,
        "total_seconds": round(time.monotonic() - job.claimed_at_seconds, 6),
        "attempts": job.attempt,
        "history": job.history,
        **job.run.record_fields(),
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

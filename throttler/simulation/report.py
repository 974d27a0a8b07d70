"""What a simulated batch did, the table the command prints, and its JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from throttler.simulation.bounds import Bounds
from throttler.simulation.calibration import GIB
from throttler.simulation.model import POLICY_LABELS

#: Group-size classes of the report: (label, smallest, largest) files.
SIZE_CLASSES = (("2-10", 2, 10), ("11-100", 11, 100), ("101-1000", 101, 1000), (">1000", 1001, math.inf))


@dataclass(frozen=True)
class ClassWait:
    groups: int
    p50_seconds: float
    max_seconds: float


@dataclass(frozen=True)
class Result:
    """What one simulated batch did."""

    policy: str
    strategy: str
    workers: int
    threads: int
    groups: int
    files: int
    completed: int
    failed: int
    stuck: int  #: never admitted or never finished (a deadlock)
    makespan_seconds: float
    bytes_read: int
    busiest_node_bytes: int  #: the most one worker read
    busy_thread_seconds: float
    lost_thread_seconds: float  #: work lost with killed workers
    utilisation: float
    daemon_seconds: float  #: the submitter's serial time charged
    capacity_bytes: int  #: admission capacity: every limit x memory_fraction
    peak_held_bytes: int  #: most memory held cluster-wide (baseline, running tasks, results)
    peak_worker_fraction: float  #: most one worker held / its memory limit
    peak_reserved_bytes: int  #: most the ledger held (throttler only)
    kills: int
    paused_worker_seconds: float
    start_delay: dict  #: size class -> ClassWait (time 0 to the first task)
    biggest_group_files: int
    biggest_group_start_seconds: float | None
    biggest_group_admission_wait_seconds: float | None  #: from its entry in the admission window
    max_admission_wait_seconds: float  #: the longest wait from window entry (throttler)
    tasks_run: int
    admission_rounds: int
    wall_seconds: float


def result_of(sim, wall_seconds: float) -> Result:
    gs, cluster = sim.groups, sim.cluster
    makespan = max((g.ended_at for g in gs if g.ended_at is not None), default=0.0)
    big = max(gs, key=lambda g: g.n_files)
    waits = [g.launched_at - g.enqueued_at for g in gs if g.launched_at is not None]
    big_wait = None if big.launched_at is None else big.launched_at - big.enqueued_at
    policy = sim.policy
    return Result(
        policy=sim.scenario.policy, strategy=sim.scenario.strategy, workers=cluster.n_workers,
        threads=cluster.threads, groups=len(gs), files=sum(g.n_files for g in gs),
        completed=sum(1 for g in gs if g.ok), failed=sum(1 for g in gs if g.ok is False),
        stuck=sum(1 for g in gs if g.ok is None), makespan_seconds=makespan, bytes_read=sim.bytes_read,
        busiest_node_bytes=max(sim.flows.bytes_by_node, default=0), busy_thread_seconds=sim.busy,
        lost_thread_seconds=sim.lost, utilisation=sim.busy / (cluster.threads * makespan) if makespan else 0.0,
        daemon_seconds=sim.daemon_seconds, capacity_bytes=cluster.capacity_bytes(sim.scenario.memory_fraction),
        peak_held_bytes=sim.peak_task_bytes + cluster.n_workers * sim.cal.worker_baseline_bytes,
        peak_worker_fraction=sim.peak_worker_bytes / cluster.memory_limit_bytes,
        peak_reserved_bytes=getattr(policy, "peak_reserved", 0), kills=sim.kills,
        paused_worker_seconds=sim.paused_seconds, start_delay=_class_waits(gs), biggest_group_files=big.n_files,
        biggest_group_start_seconds=big.first_start, biggest_group_admission_wait_seconds=big_wait,
        max_admission_wait_seconds=max(waits, default=0.0), tasks_run=sim.tasks_run,
        admission_rounds=getattr(policy, "rounds", 0), wall_seconds=wall_seconds)


def _class_waits(groups) -> dict[str, ClassWait]:
    out = {}
    for label, lo, hi in SIZE_CLASSES:
        starts = [g.first_start for g in groups if lo <= g.n_files <= hi and g.first_start is not None]
        if starts:
            out[label] = ClassWait(len(starts), float(np.median(starts)), max(starts))
    return out


def label(r: Result, pool_size: int | None = None) -> str:
    text = POLICY_LABELS[r.policy]
    return f"{text}, {pool_size} groups" if pool_size else text


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.1f}"


def policy_table(rows: list[tuple[str, Result]], bounds: Bounds) -> str:
    lb = bounds.lower_bound_seconds
    lines = ["| policy | makespan s | x lower bound | read GB/s | utilisation | groups done | failed | worker kills "
             "| paused worker-s | peak worker / limit | daemon s | biggest group starts at s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for text, r in rows:
        rate = r.bytes_read / r.makespan_seconds / 1e9 if r.makespan_seconds else 0.0
        lines.append(
            f"| {text} | {r.makespan_seconds:,.1f} | {r.makespan_seconds / lb if lb else 0:.2f} | {rate:,.1f} "
            f"| {r.utilisation:.0%} | {r.completed:,} | {r.failed + r.stuck:,} | {r.kills:,} "
            f"| {r.paused_worker_seconds:,.0f} | {r.peak_worker_fraction:.2f} | {r.daemon_seconds:,.1f} "
            f"| {_s(r.biggest_group_start_seconds)} |")
    return "\n".join(lines)


def bounds_line(bounds: Bounds) -> str:
    b = bounds
    return (f"Lower bound {b.lower_bound_seconds:,.1f} s, bound by {b.binding}: storage {b.storage_bound_seconds:,.1f} s"
            f" ({b.input_bytes / 1e12:,.2f} TB), node links {b.node_link_bound_seconds:,.1f} s, work / threads "
            f"{b.work_bound_seconds:,.1f} s, longest group {b.critical_path_seconds:,.1f} s, scheduler "
            f"{b.tasks:,} tasks {b.scheduler_bound_seconds:,.1f} s, daemon {b.daemon_bound_seconds:,.1f} s, "
            f"memory {b.memory_bound_seconds:,.1f} s.")


def as_json(rows: list[tuple[str, Result]], bounds: Bounds, storage, deadline: dict | None = None) -> dict:
    """The figures of ``--json``: the throttler's (policy d) at the top, every policy's below."""
    main = next((r for _, r in rows if r.policy == "throttler"), rows[-1][1])
    return {
        "makespan_seconds": main.makespan_seconds,
        "bytes_read": main.bytes_read,
        "storage_bandwidth_bytes_per_second": _finite(storage.aggregate_bytes_per_second),
        "node_bandwidth_bytes_per_second": _finite(storage.node_bytes_per_second),
        "request_latency_seconds": storage.request_latency_seconds,
        "lower_bounds": bounds.as_dict(),
        "binding_resource": bounds.binding,
        "policies": {text: asdict(r) for text, r in rows},
        **({"deadline": deadline} if deadline is not None else {}),
    }


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=lambda o: asdict(o))
        f.write("\n")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.0f}"

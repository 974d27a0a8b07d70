"""The operator's question: the smallest cluster of a given worker shape that meets a deadline.

The makespan falls as workers are added until another resource (storage, the
scheduler, the daemon, the longest group) binds, after which it is flat: it
is monotone enough for a bisection over worker counts. The search starts at
the fewest workers the lower bounds allow (work / threads and node links must
fit the deadline), doubles until a simulated run meets the deadline, then
bisects between the last count that missed and the first that met it. If a
bound that workers cannot move (storage, scheduler, daemon, the longest
group) already exceeds the deadline, no cluster meets it and none is run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from throttler.simulation.bounds import lower_bounds
from throttler.simulation.engine import simulate

MAX_WORKERS = 4096


@dataclass(frozen=True)
class Answer:
    policy: str
    workers: int | None  #: None: no cluster up to MAX_WORKERS meets the deadline
    makespan_seconds: float | None
    reason: str
    simulations: int


def _fixed_bound(b) -> float:
    """The part of the lower bound that adding workers cannot lower."""
    return max(b.storage_bound_seconds, b.scheduler_bound_seconds, b.daemon_bound_seconds, b.critical_path_seconds)


def smallest_cluster(estate, cluster, scenario, calibration, deadline_seconds: float,
                     max_workers: int = MAX_WORKERS) -> Answer:
    """The fewest workers of ``cluster``'s shape whose simulated makespan is within the deadline."""
    b = lower_bounds(estate, cluster, scenario, calibration)
    if _fixed_bound(b) > deadline_seconds:
        return Answer(scenario.policy, None, None, f"{b.binding} alone needs {_fixed_bound(b):,.0f} s", 0)
    scalable = b.work_bound_seconds * cluster.n_workers, b.node_link_bound_seconds * cluster.n_workers
    lo = max(1, math.ceil(max(scalable) / deadline_seconds))
    runs: dict[int, float] = {}

    def makespan(n: int) -> float:
        if n not in runs:
            r = simulate(estate, replace(cluster, n_workers=n), scenario, calibration)
            runs[n] = math.inf if (r.failed or r.stuck) else r.makespan_seconds
        return runs[n]

    missed, hi = lo - 1, lo
    while makespan(hi) > deadline_seconds:
        if hi >= max_workers:
            return Answer(scenario.policy, None, None, f"not met with {max_workers:,} workers", len(runs))
        missed, hi = hi, min(max_workers, hi * 2)
    while hi - missed > 1:
        mid = (missed + hi) // 2
        missed, hi = (mid, hi) if makespan(mid) > deadline_seconds else (missed, mid)
    return Answer(scenario.policy, hi, runs[hi], f"{hi - 1} workers miss it" if hi > 1 else "", len(runs))

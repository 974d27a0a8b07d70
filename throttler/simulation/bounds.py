"""What no policy can beat: the lower bounds of a batch on a modelled cluster.

* storage: every byte read once / the storage's aggregate bandwidth;
* node links: the bytes / the sum of the workers' links (each node's own bytes
  / its link holds for any one run too: :attr:`Result.busiest_node_bytes`);
* work: CPU and request latency thread-seconds / threads;
* critical path: the longest group alone;
* scheduler: tasks x its per-task cost (a single server);
* daemon: every group's planning, graph and submission cost (a single server);
* memory: task byte-seconds / what the workers may hold without a kill.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from throttler.planning.estimator import Estimator
from throttler.simulation.calibration import Calibration
from throttler.simulation.estate import Estate
from throttler.simulation.model import ModelCluster, Scenario
from throttler.simulation.plans import PlanCache, Work, plan_peaks, plan_work

#: Bound names as the report says which one binds.
RESOURCES = {"storage_bound_seconds": "storage bandwidth", "node_link_bound_seconds": "node links",
             "work_bound_seconds": "worker threads", "critical_path_seconds": "the longest group",
             "scheduler_bound_seconds": "the scheduler", "daemon_bound_seconds": "the daemon",
             "memory_bound_seconds": "worker memory"}


@dataclass(frozen=True)
class Bounds:
    input_bytes: int
    work_thread_seconds: float
    tasks: int
    storage_bound_seconds: float
    node_link_bound_seconds: float
    work_bound_seconds: float
    critical_path_seconds: float
    scheduler_bound_seconds: float
    daemon_bound_seconds: float
    memory_bound_seconds: float

    def named(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in RESOURCES}

    @property
    def lower_bound_seconds(self) -> float:
        return max(self.named().values())

    @property
    def binding(self) -> str:
        """The resource whose bound is the largest."""
        named = self.named()
        return RESOURCES[max(named, key=named.get)]

    def as_dict(self) -> dict:
        return {**asdict(self), "lower_bound_seconds": self.lower_bound_seconds, "binding_resource": self.binding}


def _safe_div(a: float, b: float) -> float:
    return 0.0 if math.isinf(b) else a / b


def lower_bounds(estate: Estate, cluster: ModelCluster, scenario: Scenario,
                 calibration: Calibration = Calibration()) -> Bounds:
    """Bounds of a batch; the memory bound uses the true (uncorrected) peaks and holds for any run
    without a killed worker."""
    estimator, plans = Estimator(), PlanCache(cluster.shape(), scenario)
    latency = cluster.storage.request_latency_seconds
    cpu = path = byte_seconds = daemon = 0.0
    tasks = 0
    seen: dict[tuple, Work] = {}
    for g in estate.groups:
        key = (g.n_files, g.file)
        if key not in seen:
            plan = plans.plan(g, estimator)
            seen[key] = plan_work(plan, g, calibration, plan_peaks(plan, estimator)[1], latency)
        w = seen[key]
        cpu += w.cpu_thread_seconds + w.latency_seconds
        path, tasks, byte_seconds = max(path, w.critical_path_seconds), tasks + w.tasks, byte_seconds + w.byte_seconds
        daemon += calibration.daemon.group_cost_seconds(g.n_files, w.tasks)
    holdable = cluster.n_workers * (cluster.kill_fraction * cluster.memory_limit_bytes
                                    - calibration.worker_baseline_bytes)
    storage, n_bytes = cluster.storage, estate.input_bytes
    return Bounds(n_bytes, cpu, tasks, _safe_div(n_bytes, storage.aggregate_bytes_per_second),
                  _safe_div(n_bytes, cluster.n_workers * storage.node_bytes_per_second), cpu / cluster.threads,
                  path, tasks * calibration.daemon.scheduler_seconds_per_task, daemon, byte_seconds / holdable)

"""The real planner's plans for simulated groups, their task trees and their clean-run work."""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

from throttler.cluster.snapshot import ClusterShape
from throttler.errors import DoesNotFit
from throttler.planning import planner
from throttler.planning.estimator import Estimator
from throttler.planning.memory_model import TaskPeaks, largest_file, raw_task_peaks
from throttler.planning.plan import STRATEGIES, Plan
from throttler.simulation.calibration import Calibration
from throttler.simulation.estate import GroupSpec
from throttler.simulation.model import Scenario


def tree_shape(plan: Plan) -> tuple[list[int], list[list[int]], int]:
    """(files of each leaf, inputs of each combine per level, inputs of the final), as graphs.build."""
    n, per = plan.n_files, max(1, plan.files_per_task)
    leaves = [min(per, n - i) for i in range(0, n, per)]
    fan_in, width, levels = max(2, plan.fan_in), len(leaves), []
    while width > fan_in:
        levels.append([min(fan_in, width - j) for j in range(0, width, fan_in)])
        width = len(levels[-1])
    return leaves, levels, width


@dataclass(frozen=True)
class Work:
    """One clean run of a plan: what no scheduler can shorten."""

    cpu_thread_seconds: float
    critical_path_seconds: float  #: CPU and request latency along the longest chain of tasks
    tasks: int
    byte_seconds: float  #: each task's true peak times its CPU time
    latency_seconds: float  #: request latency of all its file reads (thread-seconds)


def plan_work(plan: Plan, group: GroupSpec, cal: Calibration, peaks: TaskPeaks,
              latency_seconds: float) -> Work:
    times, scale = cal.times(plan.strategy), cal.cpu_scale(group.file)
    leaves, levels, final_inputs = tree_shape(plan)
    combine, leaf = times.combine_seconds_per_input * scale, times.leaf_seconds_per_file * scale
    final = final_inputs * combine + times.final_seconds * scale
    combines = sum(map(sum, levels)) * combine
    work = sum(leaves) * leaf + combines + final
    path = max(leaves) * (leaf + latency_seconds) + sum(max(lv) for lv in levels) * combine + final
    byte_seconds = (sum(leaves) * leaf * peaks.leaf_bytes + combines * peaks.combine_bytes
                    + final * peaks.final_bytes)
    tasks = 1 if len(leaves) == 1 else len(leaves) + sum(map(len, levels)) + 1  # one leaf: fused, as graphs.build
    return Work(work, path, tasks, byte_seconds, plan.n_files * latency_seconds)


class PlanCache:
    """Plans by everything the planner reads; owned by one simulation run (or one bound computation).

    The planner is pure, and the groups of a uniform estate differ only in
    their file count, so most groups share a plan. The key holds the
    estimator's corrections, so a plan made after the estimator learned is
    made afresh.
    """

    def __init__(self, shape: ClusterShape, scenario: Scenario, max_entries: int = 100_000):
        self.shape, self.scenario, self.max_entries = shape, scenario, max_entries
        self._plans: dict[tuple, Plan | DoesNotFit] = {}

    def plan(self, group: GroupSpec, estimator: Estimator) -> Plan:
        """The real planner's plan for ``group``; raises DoesNotFit as the planner does."""
        s = self.scenario
        key = (group.n_files, group.file, s.strategy, tuple(estimator.correction(x) for x in STRATEGIES))
        plan = self._plans.get(key)
        if plan is None:
            try:
                plan = planner.make_plan("", [group.file] * group.n_files, s.strategy, self.shape, estimator,
                                         memory_fraction=s.memory_fraction, fan_in=s.fan_in)
            except DoesNotFit as exc:
                plan = exc
            if len(self._plans) >= self.max_entries:
                self._plans.clear()
            self._plans[key] = plan
        if isinstance(plan, DoesNotFit):
            raise DoesNotFit(str(plan).replace("group :", f"group {group.name}:", 1))
        return dataclasses.replace(plan, group=group.name)


def plan_peaks(plan: Plan, estimator: Estimator) -> tuple[TaskPeaks, TaskPeaks]:
    """(the estimate, with the estimator's correction in force, the uncorrected model: the "truth").

    Right after planning the estimate's peak is the plan's ``task_peak_bytes``.
    """
    safety = planner.ATTEMPT_SAFETY_FACTOR ** (plan.attempt - 1)
    files = list(plan.files[:1])  # every file of a simulated group is priced as its largest
    est = estimator.task_peaks(plan.strategy, files, files_per_task=plan.files_per_task,
                               fan_in=plan.fan_in, n_leaves=plan.n_leaf_tasks, safety=safety)
    raw = raw_task_peaks(plan.strategy, largest_file(files), plan.files_per_task, plan.fan_in, plan.n_leaf_tasks)
    return est, raw

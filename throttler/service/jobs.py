"""One group's journey through the daemon, and the records it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from throttler.planning.plan import Plan

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
    measured_task_peak_bytes: int = 0  #: its own task's memory when it alone killed a worker (0: never)
    run_alone: bool = False  #: after a memory kill: each task runs alone on its worker
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
    full: bool = False  #: the request forces a full run (no reuse of the previous output)
    run: Any = None  #: the incremental_run.PreparedRun of the latest plan
    #: names of the private copies of the previous output its plans made (one per incremental plan),
    #: swept with its temporaries when the run ends but not counted as left by killed attempts
    snapshot_names: set[str] = field(default_factory=set)

    @property
    def strategy(self) -> str:
        return self.strategy_override or self.requested_strategy




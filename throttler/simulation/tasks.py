"""The simulator's records: tasks, submissions (runs) and groups."""

from __future__ import annotations

PENDING, READY, RUNNING, DONE, CONSUMED, LOST, CANCELLED = range(7)


class Task:
    __slots__ = ("run", "depth", "index", "inputs", "consumer", "n_waiting", "duration", "read_bytes", "peak",
                 "result", "state", "version", "worker", "inc", "started", "failures")

    def __init__(self, run, depth, index, inputs, duration, peak, result, read_bytes=0):
        self.run, self.depth, self.index, self.inputs = run, depth, index, inputs
        self.consumer = None
        self.n_waiting = len(inputs)
        self.duration, self.peak, self.result = duration, peak, result  #: duration: CPU + request latency
        self.read_bytes = read_bytes  #: from storage, before its CPU time
        self.state, self.version, self.worker, self.inc = PENDING, 0, -1, 0
        self.started, self.failures = 0.0, 0


class Run:
    """One submission of one group."""

    __slots__ = ("group", "plan", "key", "demand", "order", "state", "tasks")

    def __init__(self, group, plan, key, demand, order):
        self.group, self.plan, self.key, self.demand, self.order = group, plan, key, demand, order
        self.state, self.tasks = RUNNING, []


class Group:
    __slots__ = ("spec", "name", "n_files", "plan", "attempts", "enqueued_at", "not_before", "launched_at",
                 "first_start", "ended_at", "ok", "error", "run")

    def __init__(self, spec):
        self.spec, self.name, self.n_files, self.plan, self.attempts = spec, spec.name, spec.n_files, None, 0
        self.enqueued_at = self.not_before = 0.0
        self.launched_at = self.first_start = self.ended_at = None
        self.ok, self.error, self.run = None, "", None

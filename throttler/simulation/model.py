"""The modelled cluster: workers, storage and network, and the policy tunables of one run.

Reads are flows. Every running task that still has bytes to read holds one
flow on its worker's link and one share of the storage's aggregate bandwidth;
at every event each flow's rate is recomputed as

    rate = min(node link / flows on that node, aggregate / all flows)

so no node ever reads faster than its link and the cluster never reads faster
than the storage. A file read also costs ``request_latency_seconds`` once (the
footer and column chunk requests, issued back to back), spent holding the
thread but no bandwidth.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from throttler import units
from throttler.admission import policy as admission
from throttler.cluster.snapshot import ClusterShape
from throttler.planning import planner
from throttler.simulation.policy_names import POLICIES, POLICY_LABELS  # noqa: F401 - part of the model's names

# the command's quantities are parsed by the one set of parsers (throttler.units)
parse_bytes = units.parse_bytes
parse_rate = units.parse_rate_bytes_per_second
parse_duration = units.parse_duration_seconds


#: What policy (c)'s workers declare as MEMORY, as a share of their limit (Dask's spill threshold).
MEMORY_RESOURCE_SHARE = 0.7


@dataclass(frozen=True)
class Storage:
    """Shared storage seen by every worker."""

    aggregate_bytes_per_second: float = math.inf
    node_bytes_per_second: float = math.inf  #: each worker's link
    request_latency_seconds: float = 0.0  #: per file read

    def describe(self) -> str:
        def rate(r):
            return "unlimited" if math.isinf(r) else f"{r / 1e9:g} GB/s"
        return (f"storage {rate(self.aggregate_bytes_per_second)} aggregate, "
                f"{rate(self.node_bytes_per_second)} per worker link, "
                f"{self.request_latency_seconds * 1e3:g} ms per file request")


@dataclass(frozen=True)
class ModelCluster:
    """Identical workers, with Dask's memory thresholds, on shared storage."""

    n_workers: int
    memory_limit_bytes: int
    threads_per_worker: int
    memory_resource_bytes: int | None = None  #: declared MEMORY (None: the default share of the limit)
    pause_fraction: float = 0.8
    kill_fraction: float = 0.95
    allowed_failures: int = 3
    storage: Storage = Storage()

    @property
    def threads(self) -> int:
        return self.n_workers * self.threads_per_worker

    @property
    def resource_bytes(self) -> int:
        if self.memory_resource_bytes is None:
            return int(self.memory_limit_bytes * MEMORY_RESOURCE_SHARE)
        return self.memory_resource_bytes

    def shape(self) -> ClusterShape:
        return ClusterShape.uniform(self.n_workers, self.memory_limit_bytes, self.threads_per_worker)

    def capacity_bytes(self, memory_fraction: float) -> int:
        """What admission may fill: every limit x the fraction."""
        return self.n_workers * int(self.memory_limit_bytes * memory_fraction)


@dataclass(frozen=True)
class Scenario:
    """A policy and its tunables."""

    policy: str
    strategy: str = "auto"
    pool_size: int = 32  #: groups in flight under fixed-pool
    memory_fraction: float = admission.DEFAULT_MEMORY_FRACTION
    fan_in: int = planner.DEFAULT_FAN_IN
    max_head_wait_seconds: float = admission.DEFAULT_MAX_HEAD_WAIT_SECONDS
    admission_window: int = 32  #: waiting groups one round considers
    admission_interval_seconds: float = 0.1  #: least time between admission rounds
    peak_noise: tuple[float, float] = (1.0, 1.0)  #: true peak / model, drawn uniformly per task
    max_group_attempts: int = 4  #: the daemon's max_attempts after KilledWorker
    seed: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")


class Bandwidth:
    """Read flows sharing each node's link and the storage's aggregate bandwidth.

    Flows on one node all get the same rate, so each node keeps a counter of
    bytes served per flow since the start (advanced at each event) and a heap
    of the counter values at which its flows finish: a rate change costs one
    pass over the nodes, not over the flows.
    """

    def __init__(self, n_nodes: int, storage: Storage):
        self.aggregate, self.link = storage.aggregate_bytes_per_second, storage.node_bytes_per_second
        self.served = [0.0] * n_nodes
        self.rate = [0.0] * n_nodes
        self.heaps: list[list] = [[] for _ in range(n_nodes)]
        self.active: set[int] = set()
        self.flows = 0
        self.at = 0.0
        self.next_at = math.inf
        self.bytes_by_node = [0] * n_nodes
        self._seq = 0

    def add(self, now: float, node: int, n_bytes: int, task) -> None:
        self._advance(now)
        self._seq += 1
        heapq.heappush(self.heaps[node], (self.served[node] + n_bytes, self._seq, task))
        self.active.add(node)
        self.flows += 1
        self.bytes_by_node[node] += n_bytes
        self._rerate()

    def finished(self, now: float) -> list:
        """The tasks whose reads end at ``now`` (the time :attr:`next_at` said)."""
        self._advance(now)
        done = []
        for k in list(self.active):
            heap, served = self.heaps[k], self.served[k]
            while heap and heap[0][0] <= served * (1 + 1e-12) + 1.0:
                done.append(heapq.heappop(heap)[2])
            if not heap:
                self.active.discard(k)
        if not done:  # rounding left the soonest flow a hair short: it is done all the same
            k = min(self.active, key=lambda n: (self.heaps[n][0][0] - self.served[n]) / self.rate[n])
            done.append(heapq.heappop(self.heaps[k])[2])
            if not self.heaps[k]:
                self.active.discard(k)
        self.flows -= len(done)
        self._rerate()
        return done

    def drop_node(self, now: float, node: int) -> None:
        """A killed worker's reads stop."""
        self._advance(now)
        self.flows -= len(self.heaps[node])
        self.heaps[node] = []
        self.active.discard(node)
        self._rerate()

    def _advance(self, now: float) -> None:
        dt = now - self.at
        if dt > 0:
            for k in self.active:
                self.served[k] += self.rate[k] * dt
        self.at = now

    def _rerate(self) -> None:
        share = self.aggregate / self.flows if self.flows else math.inf
        best = math.inf
        for k in self.active:
            heap = self.heaps[k]
            r = min(self.link / len(heap), share)
            self.rate[k] = r
            best = min(best, self.at + max(0.0, heap[0][0] - self.served[k]) / r)
        self.next_at = best

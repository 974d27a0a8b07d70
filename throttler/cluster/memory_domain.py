"""Workers that share one machine's memory: their limits, capped to what the machine has.

Dask sizes each worker from its own flags, never from the others on its
machine. ``dask worker --nworkers 2 --nthreads 2`` on a 2-core host gives each
worker the host's whole memory (``memory_limit="auto"`` is the host's memory x
``min(1, nthreads / cores)``), and so does starting ``dask worker`` twice on one
host, or ``--memory-limit 20GB`` for each of two workers of a 24 GB host. Dask
then pauses each worker at 80% of a limit the host cannot give them both: the
kernel's OOM killer strikes first, and budgets taken from those limits would
admit more work than the host holds (two 24 GB workers: 28 GB of task budgets
on 24 GB).

A *memory domain* is the memory such workers share: one kernel (its boot id)
and one cgroup namespace (``/proc/self/ns/cgroup``). Processes of one host
share it; containers with their own cgroup namespace (Docker's default on
cgroup v2, every Kubernetes pod) are domains of their own even on one host and
one network address, and their memory is the container's limit
(``distributed.system.MEMORY_LIMIT``, cgroup-aware). :func:`domain_limits`
decides, from every member's own limit, the limit each is sized from: the
workers' own when together they fit, else each scaled down in proportion.
Workers meet through the scheduler's metadata (``set_metadata`` under
:data:`METADATA_KEY`), each entry written by the worker itself as it is sized.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

#: The scheduler metadata key: {domain id: {worker address: entry dict}}.
METADATA_KEY = "throttler-memory-domains"

#: limit_source of a worker sized from its own memory_limit, scaled down to its share of the machine.
CAPPED_SOURCE = "host-capped"


@dataclass(frozen=True)
class Member:
    """One worker of a domain, as it published itself."""

    address: str
    own_limit_bytes: int  #: its memory_limit, or the assumed one; 0 when it has none
    domain_memory_bytes: int  #: the memory its domain has, as it saw it


def domain_id() -> str:
    """This process's memory domain: its kernel's boot id and its cgroup namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            kernel = fh.read().strip()
    except OSError:  # not Linux: the host name stands for the machine
        return socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/cgroup")
    except OSError:
        namespace = "cgroup:[?]"
    return f"{kernel}/{namespace}"


def domain_memory_bytes() -> int:
    """The memory this process's domain has: the host's, or its cgroup's limit when lower."""
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def domain_limits(members: list[Member]) -> dict[str, int]:
    """Pure: the limit each live member of one domain is sized from, by address.

    A member with a limit of its own keeps it when the members together fit the
    domain's memory (the smallest any member saw). A member without one is
    given what the limited members leave, split evenly among such members, and
    at least an even share of the whole. When the limits so found exceed the
    domain's memory, each is scaled down in proportion, so that they sum to at most it.
    """
    if not members:
        return {}
    memory = min(m.domain_memory_bytes for m in members)
    limited = {m.address: m.own_limit_bytes for m in members if m.own_limit_bytes > 0}
    unlimited = [m.address for m in members if m.own_limit_bytes <= 0]
    if unlimited:
        leftover = max(0, memory - sum(limited.values())) // len(unlimited)
        share = max(leftover, memory // len(members))
        limited.update({address: share for address in unlimited})
    total = sum(limited.values())
    if total <= memory:
        return limited
    return {address: limit * memory // total for address, limit in limited.items()}


def members_from_metadata(entries: Mapping[str, Mapping], live: set[str]) -> list[Member]:
    """Pure: the live members of one domain from its metadata entries (dead workers' are left out)."""
    return [Member(address, int(e["own_limit_bytes"]), int(e["domain_memory_bytes"]))
            for address, e in sorted(entries.items()) if address in live]


async def publish(worker, domain: str, own_limit_bytes: int) -> None:
    """Write this worker's entry into its domain on the scheduler."""
    entry = {"own_limit_bytes": int(own_limit_bytes), "domain_memory_bytes": domain_memory_bytes()}
    await worker.scheduler.set_metadata(keys=[METADATA_KEY, domain, worker.address], value=entry)


async def live_members(worker, domain: str) -> list[Member]:
    """The domain's members the scheduler knows alive (this worker always counted alive)."""
    entries = await worker.scheduler.get_metadata(keys=[METADATA_KEY, domain], default={})
    info = await worker.scheduler.identity()
    live = set(info.get("workers", {})) | {worker.address}
    return members_from_metadata(entries or {}, live)

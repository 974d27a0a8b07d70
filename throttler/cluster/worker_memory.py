"""The daemon's own per-worker memory accounting, given to every worker by a WorkerPlugin.

No worker flag is needed. :class:`ThrottlerMemoryPlugin`, registered once with
``client.register_plugin(ThrottlerMemoryPlugin())``, runs on every worker
present and every worker that joins later (a worker restarted by its nanny
included) and gives it three resources that belong to the daemon:

* ``throttler-memory-bytes`` = ``share x memory_limit - idle RSS``: what our
  tasks running at once on that worker may hold together, in bytes. Dask
  subtracts each running task's request from it, so the tasks on one worker
  can never sum past it, however many threads the worker has.
* ``throttler-solo-bytes`` = ``(pause - margin) x memory_limit - idle RSS``:
  what one task may hold when it runs alone on the worker (Dask pauses a
  worker at ``pause`` = 0.8 of its limit).
* ``throttler-worker`` = 1: a token. Every shared task asks
  :data:`SHARED_TOKEN` of it; a task that must run alone asks all of it, so
  no other task of ours runs on that worker meanwhile.

A worker's thread count already caps how many tasks it runs at once; the
bytes cap what they hold, so no separate slot resource is needed (see
docs/memory.md). ``set_resources`` merges: the worker's own resources
(``MEMORY`` in any units, or anything else) are left as they are and are
never read.

Workers that share one machine's memory are sized together
(:mod:`throttler.cluster.memory_domain`): when their limits sum past what the
machine has (``dask worker --nworkers 2 --nthreads 2`` on a 2-core host gives
each the whole host), each is sized from its share of it instead, and a worker
that joins later has the others sized again. A worker without a memory limit
is sized from ``assumed_limit_bytes`` if given, else from what the limited
workers of its machine leave (at least an even share of it). Any limit other
than the worker's own is logged as a warning and its report says which
(``limit_source``).

A worker that loads numba later (a ``dense`` task's compiled loops: 112 MiB
for the process's life) is sized again within a second, that code taken out
of both budgets, and reports it in its heartbeats (``resident_code_bytes`` of
:mod:`throttler.cluster.snapshot`), which admission counts as the worker's own.
Without that, a 600 MB worker that had run a dense task paused under a queue
of ``sum`` and ``groupby`` groups (``tests/cluster/test_admission_e2e.py``).

A worker the daemon's checks find unable to read the data root or write the
output directory (:mod:`throttler.cluster.workers`) is withdrawn
(:func:`set_withdrawn`): sized with none of the daemon's resources, so the
scheduler gives it none of our tasks, until a later check finds it able again
and gives it back its budgets.

The submitter calls :func:`task_resources` with a task's peak and a snapshot
from :func:`read_capacities`; the result goes to ``client.compute(...,
resources=...)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from distributed import WorkerPlugin
from tornado.ioloop import PeriodicCallback

from throttler.cluster import memory_domain
from throttler.cluster.snapshot import (DEFAULT_PAUSE_FRACTION, RESIDENT_CODE_METRIC, SOLO_MARGIN,
                                        resident_code_bytes)

log = logging.getLogger(__name__)

MEMORY_BYTES = "throttler-memory-bytes"
SOLO_BYTES = "throttler-solo-bytes"
WORKER_TOKEN = "throttler-worker"
RESOURCES = (MEMORY_BYTES, SOLO_BYTES, WORKER_TOKEN)

#: The token a shared task asks: a power of two, so that sums and differences
#: of it stay exact in floating point (1024 tasks at once before it runs out).
SHARED_TOKEN = 2.0**-10

#: Share of the limit that the tasks running at once on one worker may fill.
DEFAULT_SHARE = 0.6

#: How often a worker checks whether it loaded code past its sizing (numba), and its callback's name.
RESIDENT_CODE_CHECK_SECONDS = 1.0
RESIDENT_CODE_CALLBACK = "throttler-resident-code"

#: Event topic the plugin reports each worker's sizing on (read by :func:`read_capacities`).
EVENT_TOPIC = "throttler-memory"


@dataclass(frozen=True)
class Sizing:
    """How one worker was sized: the figures behind its resources."""

    limit_bytes: int  #: the limit used (the worker's own, or assumed when it has none)
    limit_source: str  #: "memory_limit", "configured" or "host-share"
    idle_rss_bytes: int  #: the worker's RSS at setup (plus code loaded since), subtracted from both budgets
    memory_bytes: int  #: throttler-memory-bytes
    solo_bytes: int  #: throttler-solo-bytes


def worker_sizing(limit_bytes: int, limit_source: str, idle_rss_bytes: int, share: float,
                  pause_fraction: float | None) -> Sizing:
    """Pure: the two budgets of one worker."""
    pause = pause_fraction if pause_fraction else DEFAULT_PAUSE_FRACTION
    solo = max(0, int(limit_bytes * (pause - SOLO_MARGIN)) - idle_rss_bytes)
    memory = min(solo, max(0, int(limit_bytes * share) - idle_rss_bytes))
    return Sizing(limit_bytes, limit_source, idle_rss_bytes, memory, solo)


class ThrottlerMemoryPlugin(WorkerPlugin):
    """Gives each worker the daemon's resources (see the module docstring)."""

    name = "throttler-memory"
    idempotent = True
    #: why the daemon's checks found this worker unable to run our tasks (None: it can); a
    #: withdrawn worker is sized with no resources of ours, so the scheduler gives it none of our tasks
    withdrawn: str | None = None

    def __init__(self, share: float = DEFAULT_SHARE, assumed_limit_bytes: int | None = None):
        if not 0.05 <= share <= 0.95:
            raise ValueError(f"share must be within [0.05, 0.95], got {share}")
        self.share = share
        self.assumed_limit_bytes = assumed_limit_bytes

    async def setup(self, worker) -> None:
        worker.metrics[RESIDENT_CODE_METRIC] = resident_code_bytes  # in every heartbeat: see admission
        self._domain = memory_domain.domain_id()
        self._own_limit_bytes, self._own_source = self._own_limit(worker)
        self._idle_rss_bytes = _rss_bytes()
        self._code_at_setup_bytes = self._code_sized_bytes = resident_code_bytes()
        watch = PeriodicCallback(functools.partial(self._watch_code, worker), RESIDENT_CODE_CHECK_SECONDS * 1000)
        worker.periodic_callbacks[RESIDENT_CODE_CALLBACK] = watch  # the worker stops it when it closes
        watch.start()
        try:
            await memory_domain.publish(worker, self._domain, self._own_limit_bytes)
        except Exception as exc:  # noqa: BLE001 -- sized alone rather than not at all
            log.warning("throttler memory: cannot publish worker %s's memory domain: %s", worker.address, exc)
        others = await self.size(worker)
        if others:  # they were sized without this worker: size them again, with it
            await _size_again(worker, others)

    def _own_limit(self, worker) -> tuple[int, str]:
        own = int(worker.memory_manager.memory_limit or 0)
        if own:
            return own, "memory_limit"
        if self.assumed_limit_bytes:
            return int(self.assumed_limit_bytes), "configured"
        return 0, "host-share"

    async def size(self, worker) -> list[str]:
        """Size this worker from its domain's live members; returns the other members' addresses."""
        try:
            members = await memory_domain.live_members(worker, self._domain)
        except Exception as exc:  # noqa: BLE001 -- a fallback: this worker alone on its machine
            log.warning("throttler memory: cannot read worker %s's memory domain: %s", worker.address, exc)
            members = []
        if worker.address not in {m.address for m in members}:
            members.append(memory_domain.Member(worker.address, self._own_limit_bytes,
                                                memory_domain.domain_memory_bytes()))
        limit = memory_domain.domain_limits(members)[worker.address]
        source = self._own_source
        if self._own_limit_bytes and limit != self._own_limit_bytes:
            source = memory_domain.CAPPED_SOURCE
        mm = worker.memory_manager
        sizing = worker_sizing(limit, source, self._idle_bytes(), self.share, mm.memory_pause_fraction)
        if self.withdrawn:
            await worker.set_resources(**{MEMORY_BYTES: 0.0, SOLO_BYTES: 0.0, WORKER_TOKEN: 0.0})
        else:
            await worker.set_resources(**{MEMORY_BYTES: sizing.memory_bytes, SOLO_BYTES: sizing.solo_bytes,
                                          WORKER_TOKEN: 1.0})
        report = {"worker": worker.address, "name": str(worker.name), "nthreads": worker.state.nthreads,
                  "own_limit_bytes": self._own_limit_bytes, "domain_workers": len(members),
                  "withdrawn": self.withdrawn, **sizing.__dict__}
        worker.log_event(EVENT_TOPIC, report)
        level = logging.INFO if source == "memory_limit" else logging.WARNING
        log.log(level, "throttler memory: worker %s sized %s", worker.address, report)
        return [m.address for m in members if m.address != worker.address]

    def _idle_bytes(self) -> int:
        """The worker's RSS at setup, plus code it loaded since (numba, by a dense task)."""
        return self._idle_rss_bytes + max(0, self._code_sized_bytes - self._code_at_setup_bytes)

    async def _watch_code(self, worker) -> None:
        """Size the worker again once it holds more code than when it was sized (a check a second)."""
        code_bytes = resident_code_bytes()
        if code_bytes == self._code_sized_bytes:
            return
        self._code_sized_bytes = code_bytes
        try:
            await self.size(worker)
        except Exception as exc:  # noqa: BLE001 -- admission still counts the code as the worker's own
            log.warning("throttler memory: cannot size worker %s again: %s", worker.address, exc)


async def _size_again(worker, addresses: list[str]) -> None:
    """Have the workers at ``addresses`` size themselves again (through the scheduler, as ``client.run``)."""
    from distributed.protocol.pickle import dumps

    msg = {"op": "run", "function": dumps(_size_this_worker), "args": dumps(()), "kwargs": dumps({}), "wait": True}
    try:
        await worker.scheduler.broadcast(msg=msg, workers=addresses, on_error="return")
    except Exception as exc:  # noqa: BLE001 -- they keep their sizing; this worker's is right
        log.warning("throttler memory: cannot have %s sized again: %s", addresses, exc)


def set_withdrawn(client, addresses, reason: str | None) -> dict[str, object]:
    """Withdraw the workers at ``addresses`` from our tasks (``reason``), or give them back (None).

    Each sizes itself again at once: withdrawn, with none of the daemon's resources;
    given back, with its budgets (and the scheduler's sizing hook hands it the tasks
    that waited for a worker). Returns, per worker, whether its plugin was there to act.
    """
    return client.run(_withdraw_this_worker, reason, workers=list(addresses), on_error="return")


async def _withdraw_this_worker(reason: str | None, dask_worker=None) -> bool:
    """Run on a worker by :func:`set_withdrawn`."""
    plugin = dask_worker.plugins.get(ThrottlerMemoryPlugin.name)
    if not isinstance(plugin, ThrottlerMemoryPlugin) or not hasattr(plugin, "_domain"):
        return False
    if plugin.withdrawn != reason:
        plugin.withdrawn = reason
        await plugin.size(dask_worker)
    return True


async def _size_this_worker(dask_worker) -> None:
    """Run on a worker by :func:`_size_again`: its plugin sizes it again."""
    plugin = dask_worker.plugins.get(ThrottlerMemoryPlugin.name)
    if isinstance(plugin, ThrottlerMemoryPlugin) and hasattr(plugin, "_domain"):
        await plugin.size(dask_worker)


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# --------------------------------------------------------------------------- the submitter's side


@dataclass(frozen=True)
class WorkerCapacity:
    """One worker's daemon resources, as the scheduler holds them (0: not sized yet)."""

    address: str
    name: str
    memory_limit_bytes: int
    memory_bytes: int
    solo_bytes: int
    used_memory_bytes: float = 0.0
    limit_source: str = ""  #: from the worker's sizing event ("" if not seen)


class NoWorkerFits(Exception):
    """No worker's daemon resources can hold the task, even alone."""

    def __init__(self, peak_bytes: int, largest_solo_bytes: int):
        super().__init__(f"a task of {peak_bytes} B exceeds the largest worker's solo budget "
                         f"({largest_solo_bytes} B)")
        self.peak_bytes = peak_bytes
        self.largest_solo_bytes = largest_solo_bytes


def task_resources(peak_bytes: int, workers: Iterable[WorkerCapacity], alone: bool = False) -> dict[str, float]:
    """Pure: the ``resources=`` to submit a task of ``peak_bytes`` with.

    Shared (the default, when some worker's ``throttler-memory-bytes`` holds
    it): ``{memory-bytes: peak, worker: SHARED_TOKEN}``. Alone (asked for, or
    too big to share any worker): ``{solo-bytes: peak, worker: 1}``, which
    only workers whose solo budget holds it accept and which excludes every
    other task of ours there while it runs. Raises :class:`NoWorkerFits`
    when no worker could ever run it, so the request is always satisfiable.
    """
    peak = max(1, int(peak_bytes))
    workers = [w for w in workers if w.solo_bytes > 0]
    if not alone and any(w.memory_bytes >= peak for w in workers):
        return {MEMORY_BYTES: float(peak), WORKER_TOKEN: SHARED_TOKEN}
    if any(w.solo_bytes >= peak for w in workers):
        return {SOLO_BYTES: float(peak), WORKER_TOKEN: 1.0}
    raise NoWorkerFits(peak, max((w.solo_bytes for w in workers), default=0))


def capacities_from_records(records: Iterable[Mapping[str, Any]]) -> list[WorkerCapacity]:
    """Pure: :class:`WorkerCapacity` from :func:`scheduler_capacity_records` dicts."""
    return [WorkerCapacity(**r) for r in records]


def read_capacities(client) -> list[WorkerCapacity]:
    """Each live worker's daemon resources, read on the scheduler (one round trip)."""
    return capacities_from_records(client.run_on_scheduler(scheduler_capacity_records()))


def scheduler_capacity_records():
    """The function run on the scheduler; shipped by value (no throttler needed there)."""
    memory_key, solo_key, topic = MEMORY_BYTES, SOLO_BYTES, EVENT_TOPIC

    def collect(dask_scheduler) -> list[dict]:
        sources = {}
        for _, msg in dask_scheduler.get_events(topic):
            sources[msg.get("worker")] = msg.get("limit_source", "")
        out = []
        for ws in dask_scheduler.workers.values():
            res, used = ws.resources or {}, ws.used_resources or {}
            out.append(dict(address=ws.address, name=str(ws.name), memory_limit_bytes=int(ws.memory_limit or 0),
                            memory_bytes=int(res.get(memory_key, 0)), solo_bytes=int(res.get(solo_key, 0)),
                            used_memory_bytes=float(used.get(memory_key, 0.0)),
                            limit_source=sources.get(ws.address, "")))
        return sorted(out, key=lambda r: r["name"])

    return collect


def register(client, share: float = DEFAULT_SHARE, assumed_limit_bytes: int | None = None) -> None:
    """Register the plugin on the client's cluster (present and future workers).

    First the scheduler plugin that starts tasks waiting for these resources once
    a worker has them (:mod:`throttler.cluster.resource_sizing`: Dask does not).
    """
    from throttler.cluster import resource_sizing

    resource_sizing.register(client, EVENT_TOPIC)
    client.register_plugin(ThrottlerMemoryPlugin(share, assumed_limit_bytes))

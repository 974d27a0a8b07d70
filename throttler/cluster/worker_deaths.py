"""Why a worker died, from distributed's own signals, and whether a group's task was to blame.

Two events reach the scheduler's event log when a worker goes:

* the scheduler's own ``remove-worker`` (topic ``"all"``), for every removal:
  the worker's address, the keys processing on it, the ``stimulus_id`` and
  whether the removal was ``expected`` (a graceful close or retirement);
* the nanny's ``worker-restart-memory`` (topic of the same name), only when
  the nanny terminated its worker for passing the terminate fraction (95%)
  of its memory limit, with the worker's RSS at that moment. It is sent just
  after the nanny's SIGTERM and can reach the scheduler before or after the
  removal.

:class:`DeathRecorder`, a scheduler plugin, sees both through the plugin
``log_event`` hook and republishes them on :data:`DEATH_TOPIC` with what the
scheduler still knew of the worker (name, memory limit, last heartbeat RSS).
The daemon reads them back with ``client.get_events(DEATH_TOPIC)``
(:func:`fetch_deaths`) and asks the pure :func:`classify` and
:func:`group_memory_death`.

The scheduler need not have throttler installed: :func:`register` ships the
plugin by value (``cloudpickle.register_pickle_by_value``; distributed's
pickler honours it). This module therefore imports nothing from throttler.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable

from distributed.diagnostics.plugin import SchedulerPlugin

DEATH_TOPIC = "throttler-worker-death"
MEMORY_KILL_TOPIC = "worker-restart-memory"  #: the nanny's event (distributed/worker_memory.py)

#: A nanny's memory event and a removal of the same address this close in time are one death.
PAIRING_WINDOW_SECONDS = 60.0


class DeathRecorder(SchedulerPlugin):
    """Republishes removals and nanny memory kills with the worker's last known state."""

    name = "throttler-worker-deaths"
    idempotent = True

    def __init__(self):
        self.scheduler = None
        self._known: dict = {}  #: address -> WorkerState: the scheduler forgets it before the removal event

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self._known = dict(scheduler.workers)

    def add_worker(self, scheduler, worker: str) -> None:
        self._known[worker] = scheduler.workers.get(worker)

    def log_event(self, topic: str, msg: Any) -> None:
        if self.scheduler is None or not isinstance(msg, dict):
            return
        if topic == "all" and msg.get("action") == "remove-worker":
            self._publish("remove", msg["worker"], {
                "processing_keys": sorted(str(k) for k in msg.get("processing-tasks", ())),
                "stimulus_id": str(msg.get("stimulus_id", "")), "expected": bool(msg.get("expected"))})
        elif topic == MEMORY_KILL_TOPIC:
            self._publish("memory-kill", msg.get("worker", ""), {"rss_bytes": int(msg.get("rss") or 0)})

    def _publish(self, kind: str, address: str, extra: dict) -> None:
        ws = self._known.pop(address, None) if kind == "remove" else self._known.get(address)
        try:
            memory = int(ws.memory.process) if ws is not None else 0
        except (AttributeError, TypeError, KeyError):
            memory = 0
        record = {"kind": kind, "worker": address, "name": "" if ws is None else str(ws.name),
                  "memory_bytes": memory, "memory_limit_bytes": int(getattr(ws, "memory_limit", 0) or 0), **extra}
        self.scheduler.log_event(DEATH_TOPIC, record)


def register(client) -> None:
    """Register :class:`DeathRecorder` on the client's scheduler, shipped by value."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        client.register_plugin(DeathRecorder())
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def fetch_deaths(client) -> list["Death"]:
    """Every recorded death still in the scheduler's event log, classified."""
    return classify(client.get_events(DEATH_TOPIC))


# --------------------------------------------------------------------------- pure


@dataclass(frozen=True)
class Death:
    """One worker death and its cause."""

    address: str
    name: str
    cause: str  #: "memory" (the nanny killed it over its budget) or "other"
    at_seconds: float  #: scheduler time of the removal
    memory_bytes: int  #: RSS at the memory kill, else the last heartbeat's
    memory_limit_bytes: int
    processing_keys: tuple[str, ...]
    stimulus_id: str
    expected: bool  #: a graceful close or retirement


def classify(events: Iterable[tuple[float, dict]]) -> list[Death]:
    """Pair each removal with a nanny memory kill of the same address (within the window)."""
    events = list(events)
    kills = [(t, m) for t, m in events if m.get("kind") == "memory-kill"]
    deaths = []
    for at, msg in events:
        if msg.get("kind") != "remove":
            continue
        kill = next((m for t, m in kills if m["worker"] == msg["worker"]
                     and abs(t - at) <= PAIRING_WINDOW_SECONDS), None)
        deaths.append(Death(
            address=msg["worker"], name=msg.get("name") or (kill or {}).get("name", ""),
            cause="memory" if kill else "other", at_seconds=float(at),
            memory_bytes=int(kill["rss_bytes"] if kill else msg.get("memory_bytes", 0)),
            memory_limit_bytes=int(msg.get("memory_limit_bytes") or (kill or {}).get("memory_limit_bytes", 0)),
            processing_keys=tuple(msg.get("processing_keys", ())), stimulus_id=msg.get("stimulus_id", ""),
            expected=bool(msg.get("expected"))))
    return deaths


@dataclass(frozen=True)
class GroupMemoryDeath:
    """A memory kill of a worker that was running this group's tasks."""

    death: Death
    group_keys: tuple[str, ...]  #: this group's keys processing on it
    other_keys: tuple[str, ...]  #: anything else processing on it (another group's tasks)

    @property
    def sole_suspect(self) -> bool:
        """Only this group's tasks ran there: the measured memory is theirs."""
        return not self.other_keys


def group_memory_death(deaths: Iterable[Death], key_prefix: str) -> GroupMemoryDeath | None:
    """The latest memory death that had one of ``key_prefix``'s keys processing, or None.

    A death of any other cause, or one with none of the group's keys, is a
    transient failure for this group and never a reason to raise its estimate.
    """
    found = None
    for d in sorted(deaths, key=lambda d: d.at_seconds):
        mine = tuple(k for k in d.processing_keys if k.startswith(key_prefix))
        if d.cause == "memory" and mine:
            others = tuple(k for k in d.processing_keys if not k.startswith(key_prefix))
            found = GroupMemoryDeath(d, mine, others)
    return found

"""Tasks waiting for the daemon's resources start once a worker has them.

Dask reconsiders its ``no-worker`` tasks when a worker joins
(``Scheduler.add_worker`` calls ``bulk_schedule_unrunnable_after_adding_worker``),
not when a worker's resources change: the scheduler's ``set_resources`` handler
(``Scheduler.add_resources``) only records them. The daemon's resources arrive
just after a worker joins, from :class:`~throttler.cluster.worker_memory.ThrottlerMemoryPlugin`'s
``setup``. A task of ours that became ``no-worker`` while no worker had them
(every worker restarting at once, a scheduler restarted before its workers came
back, a one-worker cluster) would otherwise wait forever beside workers that can
run it.

:class:`SizingRescheduler`, a scheduler plugin, sees the sizing event each
worker logs once its resources are set (the plugin ``log_event`` hook, after
``set_resources`` has returned) and gives that worker the ``no-worker`` tasks it
can now run, exactly as Dask does for a worker that has just joined.

It also mends a side effect of that handler: ``add_resources`` sets every
used-resource count of the worker back to 0, the worker's own resources
(``MEMORY`` in any units) included, although tasks holding them may be running
there (the plugin sets up on workers already busy with the user's work). Left
so, the scheduler would place more of those tasks on that worker than its
resources allow, and the counts would go negative as the running ones finish.
On the same event the plugin recounts them from the tasks processing there.

Shipped by value (:func:`register`): the scheduler need not have throttler
installed, so this module imports nothing from throttler.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


class SizingRescheduler(SchedulerPlugin):
    """On a worker's sizing event, send the ``no-worker`` tasks it can run to it."""

    name = "throttler-resource-sizing"
    idempotent = True

    def __init__(self, topic: str):
        self.topic = topic
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != self.topic or self.scheduler is None or not isinstance(msg, dict):
            return
        ws = self.scheduler.workers.get(msg.get("worker"))
        if ws is None:
            return
        recount_used_resources(ws)
        if not self.scheduler.unrunnable:
            return
        recommendations = self.scheduler.bulk_schedule_unrunnable_after_adding_worker(ws)
        if recommendations:
            self.scheduler.transitions(recommendations, stimulus_id=f"throttler-resources-set-{time.time()}")


def recount_used_resources(ws) -> None:
    """Set the worker's used-resource counts to what its processing tasks hold."""
    used = {name: 0.0 for name in ws.resources}
    for ts in ws.processing:
        for name, quantity in (ts.resource_restrictions or {}).items():
            used[name] = used.get(name, 0.0) + quantity
    ws.used_resources = used


def register(client, topic: str) -> None:
    """Register :class:`SizingRescheduler` on the client's scheduler, shipped by value."""
    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        client.register_plugin(SizingRescheduler(topic))
    finally:
        cloudpickle.unregister_pickle_by_value(module)

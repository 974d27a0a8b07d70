"""Worker-side settings from the daemon's configuration, given to every worker by a plugin.

Task functions run in worker processes, which do not read the daemon's
configuration file. A setting they need (today only
``object_store_reads_in_flight``, :mod:`throttler.worker.store_reads`) reaches
them as its ``THROTTLER_<KEY>`` environment variable, set by
:class:`WorkerSettingsPlugin` on every worker present and joining (restarted
workers too). A worker whose own environment already has the variable keeps
it: an operator's per-worker setting beats the daemon's.
"""

from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin

#: Configuration keys read by task functions on the workers.
WORKER_KEYS = ("object_store_reads_in_flight",)


def environ_name(key: str) -> str:
    return f"THROTTLER_{key.upper()}"


class WorkerSettingsPlugin(WorkerPlugin):
    """Sets each worker's ``THROTTLER_<KEY>`` variables to the daemon's values, unless already set."""

    name = "throttler-worker-settings"

    def __init__(self, settings: dict[str, object]):
        self.settings = {environ_name(k): str(v) for k, v in settings.items()}

    def setup(self, worker) -> None:
        for name, value in self.settings.items():
            os.environ.setdefault(name, value)


def register(client, config) -> None:
    """Give the client's workers (present and future) ``config``'s worker-side settings."""
    client.register_plugin(WorkerSettingsPlugin({k: getattr(config, k) for k in WORKER_KEYS}))

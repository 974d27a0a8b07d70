"""Worker-side settings from the daemon's configuration, given to every worker by a plugin.

Task functions run in worker processes, which do not read the daemon's
configuration file. A setting they need (``object_store_reads_in_flight``,
:mod:`throttler.worker.store_reads`; ``task_mmap_threshold_bytes``,
:mod:`throttler.worker.allocator`; ``output_encode_threads``, :mod:`throttler.worker.output`) reaches
them through :class:`WorkerSettingsPlugin`, which runs on every worker present
and joining (restarted workers too) and keeps the daemon's values in the
worker process. :func:`worker_setting` answers, in order: the worker's own
``THROTTLER_<KEY>`` environment variable (an operator's per-worker setting
beats the daemon's), the daemon's value, None. The plugin never writes the
environment, so a later daemon with another value is not shadowed by an
earlier one's. The plugin also installs the worker-side log filter of
:mod:`throttler.cluster.worker_log` (a bad input's failure in one line).
"""

from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin

from throttler import config
from throttler.cluster import worker_log

#: Configuration keys read by task functions on the workers.
WORKER_KEYS = ("object_store_reads_in_flight", "task_mmap_threshold_bytes", "output_encode_threads")

#: In a worker process: the values the daemon's plugin gave, by key.
_from_daemon: dict[str, str] = {}


def environ_name(key: str) -> str:
    return f"THROTTLER_{key.upper()}"


def worker_setting(key: str) -> str | None:
    """This process's value of ``key``: its own environment, else the daemon's, else None."""
    own = os.environ.get(environ_name(key))
    return own if own is not None else _from_daemon.get(key)


def configured(key: str):
    """This process's value of ``key``, typed and validated as the configuration does, else its default."""
    value = worker_setting(key)
    if value is None:
        return getattr(config.DEFAULTS, key)
    return getattr(config.load(overrides={key: value}, environ={}), key)


class WorkerSettingsPlugin(WorkerPlugin):
    """Gives each worker the daemon's values of :data:`WORKER_KEYS`."""

    name = "throttler-worker-settings"

    def __init__(self, settings: dict[str, object]):
        self.settings = {k: str(v) for k, v in settings.items()}

    def setup(self, worker) -> None:
        _from_daemon.update(self.settings)
        worker_log.install()


def register(client, config) -> None:
    """Give the client's workers (present and future) ``config``'s worker-side settings."""
    client.register_plugin(WorkerSettingsPlugin({k: getattr(config, k) for k in WORKER_KEYS}))

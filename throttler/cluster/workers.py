"""Checks of joining workers: can they run this daemon's tasks?"""

from __future__ import annotations

from typing import Any, Callable

from throttler.cluster.snapshot import NUMBA_PRELOAD_MIN_LIMIT_BYTES

#: The distribution workers must have installed, at the daemon's version: they
#: unpickle tasks that call ``throttler.worker.kernels``.
DISTRIBUTION = "dask-throttler"


def worker_package_probe() -> Callable:
    """The function run on each worker: ``{"version", "error"}`` of its dask-throttler.

    Shipped by value (defined inside this function) so that it runs even on a
    worker without throttler. It imports ``throttler.worker.kernels`` there, which
    also takes that import out of the first task the worker runs, and, on a
    worker large enough (``NUMBA_PRELOAD_MIN_LIMIT_BYTES`` of
    :mod:`throttler.cluster.snapshot`: a limit of 2.19 GiB or more),
    ``throttler.worker.page_checks``, with which ``aligned`` and ``sum`` tasks
    check page CRCs faster (an aligned group 7-15% faster, paired). That loads numba for the process's life (112 MiB): the
    worker then reports it and is sized again without it within a second
    (:mod:`throttler.cluster.worker_memory`), a delay the 5% margin below the
    pause threshold covers. A smaller worker is left without it: on 600 MB
    workers it cost a fifth of the limit and, before it was counted, paused them.
    """
    min_limit_bytes = NUMBA_PRELOAD_MIN_LIMIT_BYTES

    def probe(dask_worker=None) -> dict:
        from importlib import import_module, metadata

        try:
            version = metadata.version("dask-throttler")
        except metadata.PackageNotFoundError:
            return {"version": None, "error": None}
        modules = ["throttler.worker.kernels"]
        limit = int(getattr(getattr(dask_worker, "memory_manager", None), "memory_limit", 0) or 0)
        if limit >= min_limit_bytes:
            modules.append("throttler.worker.page_checks")
        try:
            for module in modules:
                import_module(module)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"version": version, "error": f"importing {module}: {type(exc).__name__}: {exc}"}
        return {"version": version, "error": None}

    return probe


def worker_package_reports(client: Any, addresses) -> dict[str, object]:
    """Run the probe on ``addresses``: a report dict per worker, or the exception it raised."""
    return client.run(worker_package_probe(), workers=list(addresses), on_error="return")


def package_problem(expected_version: str, report: object) -> str | None:
    """Why a worker cannot run this daemon's tasks as expected, or None when it can."""
    if isinstance(report, BaseException):
        return f"the package check failed there: {type(report).__name__}: {report}"
    if not isinstance(report, dict):
        return f"the package check returned {report!r}"
    version, error = report.get("version"), report.get("error")
    if version is None:
        return f"{DISTRIBUTION} is not installed there; tasks will fail to unpickle"
    if version != expected_version:
        return f"{DISTRIBUTION} {version} is installed there; this daemon runs {expected_version}"
    if error:
        return f"{DISTRIBUTION} {version} is installed but its worker modules fail: {error}"
    return None


def data_root_probe(data_root: str) -> Callable:
    """The function run on each worker: ``{"error"}``, None when the worker can list ``data_root``.

    It reads the root the way the worker's tasks will, in the worker's own
    process and environment: a local directory must be listable; an object store
    root must answer a listing with the credentials and endpoint the worker has
    (``throttler.storage.check_reachable``). Shipped by value, like the package probe.
    """

    def probe() -> dict:
        import os

        try:
            from throttler import storage

            if storage.is_url(data_root):
                storage.check_reachable(data_root)
            else:
                os.listdir(storage.local_path(data_root))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            lines = str(exc).strip().splitlines()
            return {"error": f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"}
        return {"error": None}

    return probe


def data_root_reports(client: Any, addresses, data_root: str) -> dict[str, object]:
    """Run the data root probe on ``addresses``: a report dict per worker, or the exception it raised."""
    return client.run(data_root_probe(str(data_root)), workers=list(addresses), on_error="return")


def data_root_problem(data_root: str, report: object) -> str | None:
    """Why a worker cannot read ``data_root``, or None when it can."""
    if isinstance(report, BaseException):
        return f"the data root check failed there: {type(report).__name__}: {report}"
    if not isinstance(report, dict):
        return f"the data root check returned {report!r}"
    if report.get("error"):
        return (f"cannot read the data root {data_root} ({report['error']}); its tasks will fail: give it the "
                "same mount, endpoint and credentials as the daemon")
    return None

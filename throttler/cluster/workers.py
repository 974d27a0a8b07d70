"""Checks of joining workers: can they run this daemon's tasks?"""

from __future__ import annotations

from typing import Any, Callable

#: The distribution workers must have installed, at the daemon's version: they
#: unpickle tasks that call ``throttler.worker.kernels``.
DISTRIBUTION = "dask-throttler"


def worker_package_probe() -> Callable:
    """The function run on each worker: ``{"version", "error"}`` of its dask-throttler.

    Shipped by value (defined inside this function) so that it runs even on a
    worker without throttler. It imports ``throttler.worker.kernels`` there, which
    also takes that import out of the first task the worker runs.
    """

    def probe() -> dict:
        from importlib import import_module, metadata

        try:
            version = metadata.version("dask-throttler")
        except metadata.PackageNotFoundError:
            return {"version": None, "error": None}
        try:
            import_module("throttler.worker.kernels")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"version": version, "error": f"{type(exc).__name__}: {exc}"}
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
    if error:
        return f"{DISTRIBUTION} {version} is installed but importing throttler.worker.kernels fails: {error}"
    if version != expected_version:
        return f"{DISTRIBUTION} {version} is installed there; this daemon runs {expected_version}"
    return None

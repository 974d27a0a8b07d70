"""Checks of joining workers: can they run this daemon's tasks?"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable, Iterator

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
    :mod:`throttler.cluster.snapshot`: a limit of 2.81 GiB or more),
    ``throttler.worker.page_checks``, with which ``aligned`` and ``sum`` tasks
    check page CRCs faster (an aligned group 7-15% faster, paired). That loads numba for the
    process's life (112 MiB from numba's cache, 144 MiB where the worker compiles it): the
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
    return _probe_problem("data root", f"cannot read the data root {data_root}", report)


def _probe_problem(check: str, cannot: str, report: object) -> str | None:
    """What a data root or output probe's ``report`` says is wrong (None: nothing)."""
    if isinstance(report, BaseException):
        return f"the {check} check failed there: {type(report).__name__}: {report}"
    if not isinstance(report, dict):
        return f"the {check} check returned {report!r}"
    if report.get("error"):
        return (f"{cannot} ({report['error']}); its tasks would fail: give it the same mount, endpoint and "
                "credentials as the daemon")
    return None


#: Names of the files the output check leaves for a moment in the output directory: the
#: daemon's marker, and each worker's own write test (dot names ending ``.tmp``, like every
#: temporary of an output directory: swept at start if a crash leaves one).
PROBE_PREFIX = ".throttler-probe."


def output_probe(output_root: str, marker_name: str | None) -> Callable:
    """The function run on each worker: ``{"error"}``, None when the worker can write ``output_root``.

    A local output directory must be the daemon's own (``marker_name``, a file the daemon
    has just created there, must be visible: a worker on another host with no such mount, or
    another file system mounted at the same path, would write outputs nobody reads), and a
    file must be creatable and removable in it. An object store output prefix must answer a
    listing in its bucket (a PUT is not tried). Shipped by value, like the package probe.
    """
    prefix = PROBE_PREFIX

    def probe() -> dict:
        import os
        import uuid

        try:
            from throttler import storage

            if storage.is_url(output_root):
                storage.check_reachable(output_root)
                return {"error": None}
            directory = storage.local_path(output_root)
            if marker_name and not os.path.exists(os.path.join(directory, marker_name)):
                if not os.path.isdir(directory):
                    os.listdir(directory)  # raises what is wrong with the path itself
                return {"error": ("it is not the daemon's directory: the file the daemon has just created "
                                  "there is not seen (another file system at this path)")}
            test = os.path.join(directory, f"{prefix}{uuid.uuid4().hex[:12]}.tmp")
            fd = os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(test)
        except OSError as exc:  # without the test file's name: the same refusal reads the same each check
            if exc.errno is None:
                return {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
            return {"error": f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror}"}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            lines = str(exc).strip().splitlines()
            return {"error": f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"}
        return {"error": None}

    return probe


def output_reports(client: Any, addresses, output_root: str, marker_name: str | None) -> dict[str, object]:
    """Run the output probe on ``addresses``: a report dict per worker, or the exception it raised."""
    return client.run(output_probe(str(output_root), marker_name), workers=list(addresses), on_error="return")


def output_problem(output_root: str, report: object) -> str | None:
    """Why a worker cannot write ``output_root``, or None when it can."""
    return _probe_problem("output", f"cannot write the output directory {output_root}", report)


@contextlib.contextmanager
def output_marker(output_root: str) -> Iterator[str | None]:
    """The daemon's marker in a local ``output_root`` while its workers look for it: its name.

    None for an object store output, or when the daemon cannot create it (the
    workers' own write test still runs). On the way out, every probe file still in
    the directory goes too: checks run one at a time and each waits for all its
    workers, so what is left is a worker's write test cut short by its death
    (seen in the chaos tests: a worker killed mid-check left one).
    """
    from throttler import storage

    if storage.is_url(output_root):
        yield None
        return
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}.tmp"
    path = os.path.join(storage.local_path(output_root), name)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        yield None
        return
    try:
        yield name
    finally:
        _remove_probe_files(os.path.dirname(path))


def _remove_probe_files(directory: str) -> None:
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(PROBE_PREFIX) and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

"""Checks of a command's inputs, made before anything starts (no cluster, no spool).

Each raises :class:`~throttler.errors.UsageError` with one clear sentence; the
command line turns it into ``throttler: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import os

from throttler import storage
from throttler.errors import RequestError, UsageError
from throttler.groupid import validate_group


def readable_directory(path: str, what: str) -> None:
    if storage.is_url(path):
        return reachable_url(path, what)
    path = storage.local_path(path)
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} does not exist or is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not readable by this user")


def writable_directory(path: str, what: str, create: bool) -> None:
    """``path`` is a writable directory; with ``create``, a missing one is made (its parent must exist).

    An object store URL is checked by listing it (its bucket must exist and answer):
    whether this user may write there shows only when the first output is written.
    """
    if storage.is_url(path):
        return reachable_url(path, what)
    path = storage.local_path(path)
    if create and not os.path.exists(path):
        try:
            os.mkdir(path, 0o750)
        except OSError as exc:
            raise UsageError(f"{what} {path} does not exist and cannot be created: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} does not exist or is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable by this user")


def readable_file(path: str | None, what: str) -> None:
    if path is not None and not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path} does not exist or is not readable")


def reachable_url(url: str, what: str) -> None:
    """``url`` is a well-formed object store URL whose bucket exists and can be listed."""
    try:
        storage.check_url(url)
        storage.check_reachable(url)
    except storage.StorageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except OSError as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"{what} {url} cannot be listed: {detail}") from None


def group_ids(groups: list[str]) -> None:
    for group in groups:
        try:
            validate_group(group)
        except RequestError as exc:
            raise UsageError(str(exc)) from None


#: the manifest names the catalog reads (throttler/planning/catalog.py): ``.parquet`` as Parquet,
#: anything else as CSV, which pyarrow decompresses when the name ends in a codec's extension
MANIFEST_SUFFIXES = (".csv", ".parquet", ".csv.gz", ".csv.bz2", ".csv.lz4", ".csv.zst")


def manifest_format(path: str | None) -> None:
    """``path`` is named as a CSV or Parquet manifest.

    The catalog picks the format by name, so a ``manifest.json`` would be parsed
    as CSV and fail every group; refused here instead, before anything starts.
    """
    if path is not None and not os.path.basename(path).endswith(MANIFEST_SUFFIXES):
        raise UsageError(f"manifest {path} is neither CSV nor Parquet: its name must end in .csv or .parquet "
                         "(or .csv.gz, .csv.bz2, .csv.lz4, .csv.zst)")


def data_inputs(data_root: str, manifest: str | None) -> None:
    readable_directory(data_root, "data root")
    readable_file(manifest, "manifest")
    manifest_format(manifest)

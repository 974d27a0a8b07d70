"""The group catalog: which files belong to a group.

Two layouts are supported:

* a directory per group: ``<data_root>/<group_id>/*.parquet``;
* a manifest (CSV or Parquet) with columns ``group_id`` and ``file``, file paths
  relative to the data root.

Every resolved file must lie under the data root once symlinks are resolved,
and no file may appear twice in a group (two symlinks to it, a manifest listing
it twice); anything else is a :class:`~throttler.errors.CatalogError`.

The data root may be an object store URL (``s3://bucket/estate``): a group is
then the prefix ``<data_root>/<group_id>/``, listed (with pagination), and
manifest entries are keys relative to it; confinement compares normalised keys.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from throttler import storage
from throttler.errors import CatalogError, first_line
from throttler.groupid import validate_group


class Catalog:
    """Resolves group IDs to absolute file paths under ``data_root``."""

    def __init__(self, data_root: str | os.PathLike, manifest: str | os.PathLike | None = None):
        self.url_root = storage.normalise(str(data_root)) if storage.is_url(data_root) else None
        self.data_root = Path(storage.local_path(data_root)).resolve() if self.url_root is None else self.url_root
        self.manifest = Path(manifest) if manifest else None
        self._lock = threading.Lock()
        self._manifest_mtime_ns: int | None = None
        self._groups: dict[str, list[str]] = {}

    def files(self, group: str) -> list[str]:
        """Absolute, checked paths of the group's files, in a stable order."""
        validate_group(group)
        names = self._manifest_files(group) if self.manifest else self._directory_files(group)
        if not names:
            raise CatalogError(f"group {group!r} has no files")
        return _distinct([self._inside_root(name, group) for name in names], names, group)

    def groups(self) -> list[str]:
        """Every group the catalog knows (used by ``demo`` and tests)."""
        if self.manifest:
            self._load_manifest()
            return sorted(self._groups)
        if self.url_root:
            return storage.list_directories(self.url_root)
        return sorted(p.name for p in self.data_root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _directory_files(self, group: str) -> list[str]:
        if self.url_root:
            return _prefix_files(self.url_root, group)
        directory = self.data_root / group
        if not directory.is_dir():
            raise CatalogError(f"unknown group {group!r}: no directory {directory}")
        return sorted(str(p) for p in directory.iterdir() if p.name.endswith(".parquet"))

    def _manifest_files(self, group: str) -> list[str]:
        self._load_manifest()
        if group not in self._groups:
            raise CatalogError(f"unknown group {group!r}: not in manifest {self.manifest}")
        if self.url_root:
            return [rel if storage.is_url(rel) else storage.join(self.url_root, rel) for rel in self._groups[group]]
        return [str(self.data_root / rel) for rel in self._groups[group]]

    def _inside_root(self, name: str, group: str) -> str:
        if self.url_root:
            return _inside_url_root(self.url_root, name, group)
        resolved = Path(name).resolve()
        if not resolved.is_relative_to(self.data_root):
            raise CatalogError(f"group {group!r}: file {name} resolves to {resolved}, outside the data root")
        return str(resolved)

    def _load_manifest(self) -> None:
        """(Re)load the manifest when its modification time changes."""
        try:
            mtime_ns = self.manifest.stat().st_mtime_ns
        except OSError as exc:
            raise CatalogError(f"manifest {self.manifest}: {exc.strerror}") from None
        with self._lock:
            if mtime_ns == self._manifest_mtime_ns:
                return
            self._groups = _read_manifest(self.manifest)
            self._manifest_mtime_ns = mtime_ns


def _read_manifest(manifest: Path) -> dict[str, list[str]]:
    try:
        if manifest.suffix == ".parquet":
            table = pq.read_table(manifest, columns=["group_id", "file"])
        else:
            options = pacsv.ConvertOptions(column_types={"group_id": pa.string(), "file": pa.string()},
                                           include_columns=["group_id", "file"])
            table = pacsv.read_csv(manifest, convert_options=options)
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise CatalogError(f"manifest {manifest}: cannot read columns group_id, file ({exc})") from None
    groups: dict[str, list[str]] = {}
    for group, rel in zip(table.column("group_id").to_pylist(), table.column("file").to_pylist()):
        if group is None or rel is None:
            continue
        groups.setdefault(str(group), []).append(str(rel))
    return groups


def _prefix_files(url_root: str, group: str) -> list[str]:
    """The ``.parquet`` objects under ``<url_root>/<group>/``; a missing bucket or prefix is a CatalogError."""
    prefix = storage.join(url_root, group)
    try:
        files = storage.list_files(prefix, ".parquet")
    except FileNotFoundError:
        raise CatalogError(f"unknown group {group!r}: nothing under {prefix}/") from None
    except OSError as exc:
        if storage.store_failure(exc) == storage.TRANSIENT:
            raise OSError(f"group {group!r}: cannot list {prefix}/ ({first_line(exc, 200)})") from None
        raise CatalogError(f"group {group!r}: cannot list {prefix}/ ({first_line(exc, 200)})") from None
    if not files:
        raise CatalogError(f"unknown group {group!r}: no .parquet objects under {prefix}/")
    return files


def _inside_url_root(url_root: str, name: str, group: str) -> str:
    try:
        resolved = storage.normalise(name)
        storage.check_url(resolved)
    except storage.StorageError as exc:
        raise CatalogError(f"group {group!r}: {exc}") from None
    if not resolved.startswith(url_root.rstrip("/") + "/"):
        raise CatalogError(f"group {group!r}: file {name} resolves to {resolved}, outside the data root")
    return resolved


def _distinct(resolved: list[str], names: list[str], group: str) -> list[str]:
    """``resolved``, refused when two entries are one file (two symlinks to it, or a manifest
    listing it twice): the group's sum counts each file once, so which was meant is not ours to
    guess. Hard links are different paths, so different files (``throttler generate`` makes them)."""
    seen: dict[str, str] = {}
    for name, path in zip(names, resolved):
        if path in seen:
            raise CatalogError(f"group {group!r}: {seen[path]} and {name} are the same file ({path});"
                               " list each file of a group once")
        seen[path] = name
    return resolved


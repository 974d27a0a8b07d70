"""The group catalog: which files belong to a group.

Two layouts are supported:

* a directory per group: ``<data_root>/<group_id>/*.parquet``;
* a manifest (CSV or Parquet) with columns ``group_id`` and ``file``, file paths
  relative to the data root.

Every resolved file must lie under the data root once symlinks are resolved;
anything else is a :class:`~throttler.errors.CatalogError`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from throttler.errors import CatalogError
from throttler.groupid import validate_group


class Catalog:
    """Resolves group IDs to absolute file paths under ``data_root``."""

    def __init__(self, data_root: str | os.PathLike, manifest: str | os.PathLike | None = None):
        self.data_root = Path(data_root).resolve()
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
        return [self._inside_root(name, group) for name in names]

    def groups(self) -> list[str]:
        """Every group the catalog knows (used by ``demo`` and tests)."""
        if self.manifest:
            self._load_manifest()
            return sorted(self._groups)
        return sorted(p.name for p in self.data_root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _directory_files(self, group: str) -> list[str]:
        directory = self.data_root / group
        if not directory.is_dir():
            raise CatalogError(f"unknown group {group!r}: no directory {directory}")
        return sorted(str(p) for p in directory.iterdir() if p.name.endswith(".parquet"))

    def _manifest_files(self, group: str) -> list[str]:
        self._load_manifest()
        if group not in self._groups:
            raise CatalogError(f"unknown group {group!r}: not in manifest {self.manifest}")
        return [str(self.data_root / rel) for rel in self._groups[group]]

    def _inside_root(self, name: str, group: str) -> str:
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

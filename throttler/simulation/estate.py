"""The estate to simulate: groups of files with their sizes, from a manifest or the case study."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from throttler.commands.generate import EstateSpec, group_sizes
from throttler.planning.footers import file_info
from throttler.planning.plan import FileInfo

#: The case study's estate: about 140,000 files of about 140 MB (20 TB), 6,000,000 rows each,
#: in long-tailed groups of 2 to 18,000 files.
CASE_STUDY_FILES = 140_000
CASE_STUDY_FILE_BYTES = 140_000_000
CASE_STUDY_ROWS = 6_000_000
CASE_STUDY_DECODED_BYTES = 55_600_000  #: 6M rows decoded (path, Date, value), as measured
CASE_STUDY_LARGEST_GROUP = 18_000


@dataclass(frozen=True)
class GroupSpec:
    """One group as the simulator sees it: its file count, its largest file, its bytes."""

    name: str
    n_files: int
    file: FileInfo  #: the largest file: what the planner prices every file of the group as
    input_bytes: int  #: the group's bytes on storage, read once by its leaves


@dataclass(frozen=True)
class Estate:
    groups: tuple[GroupSpec, ...]
    source: str  #: how it was made, for the report

    @property
    def files(self) -> int:
        return sum(g.n_files for g in self.groups)

    @property
    def input_bytes(self) -> int:
        return sum(g.input_bytes for g in self.groups)

    @property
    def sizes(self) -> list[int]:
        return [g.n_files for g in self.groups]

    def describe(self) -> str:
        sizes = self.sizes
        return (f"{self.files:,} files, {self.input_bytes / 1e12:,.2f} TB, in {len(sizes):,} groups of "
                f"{min(sizes):,} to {max(sizes):,} files ({self.source})")


def seed_sizes(total_files: int = CASE_STUDY_FILES, seed: int = 0, max_files: int = CASE_STUDY_LARGEST_GROUP,
               min_files: int = 2) -> list[int]:
    """Long-tailed group sizes (:func:`throttler.generate.group_sizes`) totalling about ``total_files``.

    The number of groups is the smallest whose sizes reach ``total_files``.
    """
    def sizes(groups: int) -> list[int]:
        return group_sizes(EstateSpec(groups=groups, min_files=min_files, max_files=max_files, seed=seed))

    lo, hi = 1, max(1, total_files // min_files)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(sizes(mid)) >= total_files:
            hi = mid
        else:
            lo = mid + 1
    return sizes(lo)


def uniform_estate(sizes: list[int], file_bytes: int = CASE_STUDY_FILE_BYTES, rows: int = CASE_STUDY_ROWS,
                   decoded_bytes: int = CASE_STUDY_DECODED_BYTES, source: str = "given sizes") -> Estate:
    """Groups of ``sizes`` files, every file alike."""
    file = FileInfo("/sim/file.parquet", file_bytes, rows, decoded_bytes)
    return Estate(tuple(GroupSpec(f"g{i:05d}", n, file, n * file_bytes) for i, n in enumerate(sizes)), source)


def case_study(seed: int = 0, total_files: int = CASE_STUDY_FILES,
               largest_group: int = CASE_STUDY_LARGEST_GROUP) -> Estate:
    """The case study's estate, seeded (``seed`` changes the group sizes, not their law)."""
    return uniform_estate(seed_sizes(total_files, seed, largest_group),
                          source=f"case study, seed {seed}, {CASE_STUDY_FILE_BYTES / 1e6:g} MB files")


def _read_manifest(path: Path):
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    missing = {"group_id", "file"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: the manifest lacks column(s) {sorted(missing)}")
    return table


def from_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                  bytes_per_row: float = CASE_STUDY_FILE_BYTES / CASE_STUDY_ROWS) -> Estate:
    """Groups of a manifest (columns ``group_id``, ``file``, optional ``bytes``).

    Without ``bytes`` every file's footer is read (under ``data_root``, default
    the manifest's directory); with it, rows and decoded size are taken in the
    case study's proportions (``bytes_per_row``).
    """
    path = Path(path)
    table = _read_manifest(path)
    root = Path(data_root) if data_root else path.parent
    groups: dict[str, list[FileInfo]] = {}
    sizes = table.column("bytes").to_pylist() if "bytes" in table.column_names else None
    for i, (group, name) in enumerate(zip(table.column("group_id").to_pylist(), table.column("file").to_pylist())):
        if sizes is None:
            info = file_info(str(root / str(name)))
        else:
            rows = int(sizes[i] / bytes_per_row)
            info = FileInfo(str(root / str(name)), int(sizes[i]), rows,
                            int(rows * CASE_STUDY_DECODED_BYTES / CASE_STUDY_ROWS))
        groups.setdefault(str(group), []).append(info)
    specs = tuple(GroupSpec(name, len(files), max(files, key=lambda f: f.size_bytes),
                            sum(f.size_bytes for f in files)) for name, files in groups.items())
    return Estate(specs, f"manifest {path.name}")

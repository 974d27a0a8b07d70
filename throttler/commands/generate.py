"""A synthetic estate shaped like the seed's: long-tailed groups of simulation files.

Each file holds ``paths x dates`` rows (default 50,000 x 120 = 6,000,000) sorted
by (path, Date), with dates unevenly spaced over a horizon and seeded random
values. Files of one estate share their keys, as the simulator writes them.
Big groups can be realised with hard links to a few physical files, so a group
of thousands of files needs little disk.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from throttler.durable import fsync_dir


@dataclass(frozen=True)
class EstateSpec:
    groups: int = 10
    max_files: int = 50
    min_files: int = 2
    paths: int = 50_000
    dates: int = 120
    seed: int = 0
    physical_files: int | None = None  #: pool of real files; the rest are hard links
    tail_alpha: float = 1.1  #: Pareto shape of group sizes (smaller: longer tail)


def group_sizes(spec: EstateSpec) -> list[int]:
    """Long-tailed sizes in [min_files, max_files]; the largest group has max_files."""
    rng = np.random.default_rng(spec.seed)
    raw = spec.min_files * (1.0 + rng.pareto(spec.tail_alpha, size=spec.groups))
    sizes = np.clip(np.round(raw), spec.min_files, spec.max_files).astype(int)
    if spec.groups:
        sizes[int(np.argmax(sizes))] = spec.max_files
    return [int(s) for s in sizes]


def simulation_dates(n_dates: int, seed: int) -> np.ndarray:
    """``n_dates`` unevenly spaced future dates (date32 days): dense first, sparse later."""
    rng = np.random.default_rng(seed + 7919)
    start = np.datetime64("2027-01-01", "D").astype(np.int64)
    gaps = np.maximum(1, np.round(np.geomspace(1, 180, n_dates) * rng.uniform(0.8, 1.2, n_dates)))
    return (start + np.cumsum(gaps).astype(np.int64)).astype(np.int32)


def simulation_table(n_paths: int, dates: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """One simulation file's table, sorted by (path, Date)."""
    rows = n_paths * len(dates)
    return pa.table({
        "path": pa.array(np.repeat(np.arange(n_paths, dtype=np.int64), len(dates))),
        "Date": pa.array(np.tile(dates, n_paths), pa.date32()),
        "value": pa.array(rng.standard_normal(rows)),
    })


def write_estate(root: str | os.PathLike, spec: EstateSpec, progress=None) -> dict[str, list[str]]:
    """Write the estate under ``root`` (one directory per group) and ``root/manifest.csv``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dates = simulation_dates(spec.dates, spec.seed)
    rng = np.random.default_rng(spec.seed + 1)
    pool: list[Path] = []
    groups: dict[str, list[str]] = {}
    for g, size in enumerate(group_sizes(spec)):
        group = f"g{g:05d}"
        directory = root / group
        directory.mkdir(exist_ok=True)
        groups[group] = [_write_file(directory / f"sim-{i:05d}.parquet", spec, dates, rng, pool, root)
                         for i in range(size)]
        fsync_dir(directory)
        if progress:
            progress(group, size)
    _write_manifest(root / "manifest.csv", groups)
    return groups


def _write_file(target: Path, spec: EstateSpec, dates, rng, pool: list[Path], root: Path) -> str:
    if target.exists():
        target.unlink()
    if spec.physical_files is not None and len(pool) >= spec.physical_files:
        os.link(pool[rng.integers(len(pool))], target)
    else:
        pq.write_table(simulation_table(spec.paths, dates, rng), target, write_page_checksum=True)
        pool.append(target)
    return str(target.relative_to(root))


def _write_manifest(path: Path, groups: dict[str, list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group_id", "file"])
        for group, files in groups.items():
            writer.writerows([group, f] for f in files)

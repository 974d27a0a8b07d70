"""Atomic output files: written under a temporary name, fsynced, renamed into place.

A reader of the output directory sees either no file or the whole file, never a
partial one. Temporary names start with a dot and end in ``.tmp`` so they are
easy to sweep after a crash (:func:`sweep_temporaries`).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from throttler import contract

TMP_SUFFIX = ".tmp"
OUTPUT_MODE = 0o640  #: owner read-write, group read, nobody else
OUTPUT_SUFFIX = ".parquet"


def output_path_for(output_root: str | os.PathLike, group: str) -> str:
    """The one output file of ``group`` (the group ID is validated upstream)."""
    return str(Path(output_root) / f"{group}{OUTPUT_SUFFIX}")


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_output(output_path: str, paths: np.ndarray, dates_ns: np.ndarray, values: np.ndarray,
                 date_type: pa.DataType | None) -> int:
    """Write the (path, Date, value) table atomically; returns the bytes written."""
    table = pa.table({
        "path": pa.array(paths, pa.int64()),
        "Date": contract.ns_to_date_type(dates_ns, date_type or contract.DATE_NS),
        "value": pa.array(values, pa.float64()),
    })
    directory, name = os.path.split(output_path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OUTPUT_MODE), "wb") as fh:
            pq.write_table(table, fh, write_page_checksum=True, use_dictionary=["path", "Date"])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, output_path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory or ".")
    return os.path.getsize(output_path)


def sweep_temporaries(output_root: str | os.PathLike, group: str | None = None) -> list[str]:
    """Remove temporary files left by tasks that died mid-write; returns their names.

    With ``group``, only that group's (called when its run ends: no attempt of
    it is writing any more); without, every one (at start, before any run).
    """
    pattern = re.compile(re.escape(f".{group}{OUTPUT_SUFFIX}.") + r"[0-9a-f]{12}" + re.escape(TMP_SUFFIX)) \
        if group else re.compile(r"\..*" + re.escape(TMP_SUFFIX))
    removed = []
    for entry in os.scandir(output_root):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            _unlink_quietly(entry.path)
            removed.append(entry.name)
    return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

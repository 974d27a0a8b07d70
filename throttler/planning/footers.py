"""What the planner reads of each file: its Parquet footer, as a FileInfo."""

from __future__ import annotations

import contextlib

import pyarrow as pa
import pyarrow.parquet as pq

from throttler import storage
from throttler.errors import DataError
from throttler.planning.plan import FileInfo
from throttler.worker import pages


def file_info(path: str) -> FileInfo:
    """Read one file's footer: size on disk, rows, uncompressed bytes."""
    try:
        size_bytes = storage.size_bytes(path)
        md = pq.read_metadata(storage.open_input(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read the Parquet footer ({exc})") from None
    decoded = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return FileInfo(path=path, size_bytes=size_bytes, rows=md.num_rows, decoded_bytes=decoded,
                    **key_domain_info(path, md))


def key_domain_info(path: str, md: pq.FileMetaData) -> dict:
    """``path_min``/``path_max`` from the footer's statistics (None unless every row group has
    them) and ``date_count`` from the first row group's Date dictionary page header (0 if none)."""
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    if "path" not in names or "Date" not in names or md.num_row_groups == 0:
        return {}
    stats = [md.row_group(i).column(names.index("path")).statistics for i in range(md.num_row_groups)]
    out = {}
    if all(s is not None and s.has_min_max for s in stats):
        out = {"path_min": min(int(s.min) for s in stats), "path_max": max(int(s.max) for s in stats)}
    with contextlib.suppress(OSError, pa.ArrowException), storage.open_input(path) as source:
        out["date_count"] = pages.dictionary_size(md.row_group(0).column(names.index("Date")), source)
    return out

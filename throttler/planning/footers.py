"""What the planner reads of each file: its Parquet footer, as a FileInfo."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from throttler.errors import DataError
from throttler.planning.plan import FileInfo


def file_info(path: str) -> FileInfo:
    """Read one file's footer: size on disk, rows, uncompressed bytes."""
    try:
        size_bytes = os.stat(path).st_size
        md = pq.read_metadata(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read the Parquet footer ({exc})") from None
    decoded = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return FileInfo(path=path, size_bytes=size_bytes, rows=md.num_rows, decoded_bytes=decoded)

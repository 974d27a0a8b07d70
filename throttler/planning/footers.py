"""What the planner reads of each file: its Parquet footer, as a FileInfo."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import tenacity

from throttler import storage
from throttler.errors import DataError
from throttler.planning.plan import FileInfo
from throttler.worker import pages


#: Footers read at once for an object store group (each is a few ranged GETs of
#: latency, not bandwidth: many in flight hide the round trips).
OBJECT_FOOTER_THREADS = 32

#: A footer the store would not serve (throttled, 5xx, dropped) after its client's own
#: retries is read again a few times before the planning attempt fails as an outage:
#: the S3 client cannot retry a throttled ranged GET shorter than the error's body
#: (see :func:`throttler.storage.store_failure`), and one footer must not cost a group's attempt.
FOOTER_RETRY = dict(wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
                    stop=tenacity.stop_after_attempt(storage.S3_REQUEST_MAX_ATTEMPTS),
                    retry=tenacity.retry_if_exception_type(OSError), reraise=True)


def file_infos(paths: list[str]) -> list[FileInfo]:
    """:func:`file_info` of every path, in order; object store footers concurrently."""
    if not paths or not storage.is_url(paths[0]):
        return [file_info(path) for path in paths]
    with ThreadPoolExecutor(min(OBJECT_FOOTER_THREADS, len(paths)), thread_name_prefix="footers") as pool:
        return list(pool.map(object_file_info, paths))


def object_file_info(url: str) -> FileInfo:
    """:func:`file_info` of an object, read again on an outage (:data:`FOOTER_RETRY`)."""
    return tenacity.Retrying(**FOOTER_RETRY)(file_info, url)


def file_info(path: str) -> FileInfo:
    """Read one file's footer: size on disk, rows, uncompressed bytes (one open: ranged reads on a store)."""
    try:
        with storage.open_input(path) as source:
            size_bytes = source.size()
            md = pq.read_metadata(source)
            domain = key_domain_info(path, md, source)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise storage.store_error(exc, path) or DataError(f"{path}: cannot read the Parquet footer ({exc})") from None
    decoded = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return FileInfo(path=path, size_bytes=size_bytes, rows=md.num_rows, decoded_bytes=decoded,
                    row_group_paths=row_group_paths(md), **domain)


def row_group_paths(md: pq.FileMetaData) -> tuple[tuple[int, int, int], ...]:
    """Each row group's (rows, smallest ``path``, largest ``path``) from its statistics; () without them.

    See :meth:`FileInfo.may_share_keys`: equal row groups with other path
    ranges prove the keys are not the reference's, whatever the encoding.
    """
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    if "path" not in names:
        return ()
    index, layout = names.index("path"), []
    for rg in range(md.num_row_groups):
        row_group = md.row_group(rg)
        stats = row_group.column(index).statistics
        if stats is None or not stats.has_min_max:
            return ()
        layout.append((row_group.num_rows, int(stats.min), int(stats.max)))
    return tuple(layout)


def key_domain_info(path: str, md: pq.FileMetaData, source: pa.NativeFile | None = None) -> dict:
    """``path_min``/``path_max`` from the footer's statistics (None unless every row group has
    them) and ``date_count`` from the first row group's Date dictionary page header (0 if none)."""
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    if "path" not in names or "Date" not in names or md.num_row_groups == 0:
        return {}
    stats = [md.row_group(i).column(names.index("path")).statistics for i in range(md.num_row_groups)]
    out = {}
    if all(s is not None and s.has_min_max for s in stats):
        out = {"path_min": min(int(s.min) for s in stats), "path_max": max(int(s.max) for s in stats)}
    with contextlib.suppress(OSError, pa.ArrowException):
        if source is None:
            with storage.open_input(path) as opened:
                out["date_count"] = pages.dictionary_size(md.row_group(0).column(names.index("Date")), opened)
        else:
            out["date_count"] = pages.dictionary_size(md.row_group(0).column(names.index("Date")), source)
    return out

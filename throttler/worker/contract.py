"""The input data contract: what a simulation file must hold, checked per file.

Columns ``path`` (any integer type), ``Date`` (date32/date64 or timestamp) and
``value`` (float32/float64). Extra columns are ignored. Every violation raises
:class:`~throttler.errors.DataError` naming the file and the problem.

Keys are normalised for computation to ``path`` int64 and ``Date`` int64
nanoseconds since the epoch, so files of one group may mix integer widths or
date representations; the output keeps the ``Date`` type of the group's first
file.

Corruption. A file that cannot be decoded (bad footer, page header, compressed
stream) is a DataError, never a retried I/O error: only an ``OSError`` carrying
an ``errno`` (a failed system call) is left to the retry policy. Page CRCs are
verified when the writer stored them (``write_page_checksum=True``); without
them, garbage inside a page's values can decode to plausible numbers, which
Parquet gives no way to detect.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from throttler import storage
from throttler.errors import DataError, first_line

KEY_COLUMNS = ("path", "Date")
VALUE_COLUMN = "value"
REQUIRED_COLUMNS = KEY_COLUMNS + (VALUE_COLUMN,)
DATE_NS = pa.timestamp("ns")


@dataclass(frozen=True)
class FileSchema:
    """The checked types of one file's three contract columns."""

    path_type: pa.DataType
    date_type: pa.DataType
    value_type: pa.DataType
    num_rows: int
    num_row_groups: int


def open_parquet(path: str, source: pa.NativeFile | None = None, verify_pages: bool = True) -> pq.ParquetFile:
    """Open ``path`` (footer only; through ``source`` if given); unreadable or non-Parquet files are DataErrors.

    Pages are checked against their CRC when the file carries one: about 16-30
    ms of CPU for a 6M-row file's three columns, a quarter to a third of their
    read (README, "The price of page checksums"). ``verify_pages=False`` leaves
    that to the caller (:mod:`throttler.worker.page_checks`, several times faster).
    """
    try:
        return pq.ParquetFile(storage.open_input(path) if source is None else source,
                              page_checksum_verification=verify_pages)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise _open_error(exc, path) from None


def open_checked(path: str, load_numba: bool = True):
    """``path`` opened for a task's reads, its page CRCs checked by :mod:`throttler.worker.page_checks`
    (ISA-L's CRC, several times pyarrow's speed) where it can, else by pyarrow (:func:`open_parquet`).

    That module loads numba (0.34 s and 100 MiB of RSS, 68 MiB of it LLVM's
    library pages). ``load_numba=False`` uses it only where this process has
    loaded it already (a worker of 2.81 GiB or more, where the daemon's package
    probe loads it, or one that ran a ``dense`` task; either reports that code and
    is sized again without it), so an ``aligned`` or ``sum`` task never grows its
    worker by more than its estimate.
    """
    loaded = sys.modules.get("throttler.worker.page_checks")  # None, or maybe still being imported by a thread
    if not load_numba and not getattr(loaded, "LOADED", False):
        return open_parquet(path)
    from throttler.worker import page_checks  # waits for another thread's import to finish

    return page_checks.open_checked(path)


def open_source(path: str) -> pa.NativeFile:
    """``path`` opened for reading (on an object store: one HEAD), with :func:`open_parquet`'s errors."""
    try:
        return storage.open_input(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise _open_error(exc, path) from None


def _open_error(exc: BaseException, path: str) -> Exception:
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found")
    return storage.store_error(exc, path) or DataError(f"{path}: not a readable Parquet file ({first_line(exc, 200)})")


def check_schema(pf: pq.ParquetFile, path: str) -> FileSchema:
    """Check the three contract columns of an open file against the contract."""
    schema = pf.schema_arrow
    missing = [c for c in REQUIRED_COLUMNS if schema.get_field_index(c) < 0]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; have {schema.names}")
    path_type = schema.field("path").type
    date_type = schema.field("Date").type
    value_type = schema.field(VALUE_COLUMN).type
    if not pa.types.is_integer(path_type):
        raise DataError(f"{path}: column 'path' must be an integer type, found {path_type}")
    if not (pa.types.is_date(date_type) or pa.types.is_timestamp(date_type)):
        raise DataError(f"{path}: column 'Date' must be a date or timestamp, found {date_type}")
    if not (pa.types.is_float32(value_type) or pa.types.is_float64(value_type)):
        raise DataError(f"{path}: column 'value' must be float32 or float64, found {value_type}")
    md = pf.metadata
    return FileSchema(path_type, date_type, value_type, md.num_rows, md.num_row_groups)


def key_chunks(pf: pq.ParquetFile, path: str, schema: FileSchema, read_ranges=None) -> list[bytes]:
    """The key columns' encoded bytes with their layout, read straight from the file.

    Equal lists mean identical keys: identical encoded bytes under an identical
    physical layout decode to identical keys. Unequal lists prove nothing: the
    caller then decodes and compares. Comparing the lists directly (a memcmp,
    about 0.1 ms for the seed's 0.7 MB of key chunks) is exact and about ten
    times cheaper than hashing both, and far cheaper than decoding.

    ``read_ranges`` reads a list of (offset, length) ranges of the file (on an
    object store: coalesced, concurrent GETs, :mod:`throttler.worker.store_reads`);
    by default they are read in turn from a new handle of ``path``. Either way
    the list holds the same bytes.
    """
    type_header, layout, ranges = _key_plan(pf.metadata, schema)
    parts = [type_header]
    chunks = iter(_read_in_turn(path, ranges) if read_ranges is None else read_ranges(ranges))
    for rows, *headers in layout:
        parts.append(rows)
        for header in headers:
            parts.extend((header, next(chunks)))
    return parts


def key_layout(pf: pq.ParquetFile, schema: FileSchema) -> tuple:
    """What :func:`key_chunks` holds besides the bytes, with each chunk's size, from the footer alone.

    Different layouts mean different :func:`key_chunks` lists (the lists hold
    the layout and bytes of these lengths), so a file whose layout differs from
    the reference's need not have its key bytes read to know they differ.
    """
    type_header, layout, ranges = _key_plan(pf.metadata, schema)
    return type_header, tuple(map(tuple, layout)), tuple(length for _, length in ranges)


def _key_plan(md: pq.FileMetaData, schema: FileSchema) -> tuple[bytes, list[list[bytes]], list[tuple[int, int]]]:
    """(type header, per row group [rows, chunk headers...], the key chunks' (offset, length))."""
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    key_idx = [names.index(c) for c in KEY_COLUMNS]
    layout, ranges = [], []
    for rg in range(md.num_row_groups):
        row_group = md.row_group(rg)
        layout.append([row_group.num_rows.to_bytes(8, "little")])
        for ci in key_idx:
            header, chunk_range = _chunk_range(row_group.column(ci))
            layout[-1].append(header)
            ranges.append(chunk_range)
    return f"{schema.path_type}|{schema.date_type}|".encode(), layout, ranges


def _chunk_range(col: pq.ColumnChunkMetaData) -> tuple[bytes, tuple[int, int]]:
    start = col.data_page_offset
    if col.has_dictionary_page and col.dictionary_page_offset is not None:
        start = min(start, col.dictionary_page_offset)
    header = f"{col.physical_type}|{col.compression}|{col.num_values}|".encode()
    return header, (start, col.total_compressed_size)


def _read_in_turn(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    with storage.open_input(path) as source:
        return [source.read_at(length, offset) for offset, length in ranges]


def read_keys(pf: pq.ParquetFile, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode the key columns as (path int64, Date int64 ns); nulls are DataErrors."""
    table = read_columns(pf, path, KEY_COLUMNS)
    return normalise_keys(table, path)


def read_columns(pf: pq.ParquetFile, path: str, columns) -> pa.Table:
    """Decode whole columns of an open file; a corrupt file is a DataError naming it."""
    try:
        return pf.read(columns=list(columns))
    except DECODE_ERRORS as exc:
        raise decode_error(exc, path, f"cannot decode {', '.join(map(repr, columns))}") from None


def iter_key_batches(pf: pq.ParquetFile, path: str, batch_rows: int):
    """The key columns as stored, ``batch_rows`` rows at a time: (paths, dates) chunked arrays.

    A corrupt file is a DataError naming it; null keys are DataErrors.
    """
    batches = pf.iter_batches(batch_size=batch_rows, columns=list(KEY_COLUMNS), use_threads=True)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DECODE_ERRORS as exc:
            raise decode_error(exc, path, "cannot decode 'path', 'Date'") from None
        yield key_columns(pa.Table.from_batches([batch]), path)


#: What pyarrow raises on a file it cannot decode (ArrowMemoryError is left
#: out on purpose: it is a MemoryError, which the retry policy re-plans).
DECODE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowIndexError,
                 pa.ArrowSerializationError, OSError)


def decode_error(exc: BaseException, path: str, what: str) -> Exception:
    """The DataError for ``exc``, or ``exc`` itself when it is a system call's I/O error.

    pyarrow reports undecodable data (a bad page header, a failed CRC) as an
    OSError without an errno; a failed read of shared storage carries one and
    stays an OSError, which the retry policy treats as transient.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    store = storage.store_error(exc, path)  # refused or missing: permanent; unavailable: retried
    if store is not None:
        return store
    return DataError(f"{path}: {what} ({first_line(exc, 200)})")


def key_columns(table: pa.Table, path: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The (path, Date) columns of ``table`` as stored; nulls are DataErrors."""
    paths, dates = table.column("path"), table.column("Date")
    if paths.null_count or dates.null_count:
        raise DataError(f"{path}: null keys in 'path' or 'Date'")
    return paths, dates


def normalise_keys(table: pa.Table, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(path, Date) columns of ``table`` as int64 arrays (Date in ns since the epoch)."""
    paths, dates = key_columns(table, path)
    path_arr = paths.cast(pa.int64()).to_numpy()
    date_arr = date_to_ns(dates, path).to_numpy().view("int64")
    return path_arr, date_arr


def date_to_ns(dates: pa.ChunkedArray, path: str) -> pa.ChunkedArray:
    """Cast a date or timestamp column to timestamp[ns] (time zones are dropped)."""
    try:
        if pa.types.is_timestamp(dates.type) and dates.type.tz is not None:
            dates = dates.cast(pa.timestamp(dates.type.unit))
        return pc.cast(dates, DATE_NS)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: 'Date' out of range for nanosecond timestamps ({first_line(exc, 200)})") from None


def ns_to_date_type(date_ns: np.ndarray, date_type: pa.DataType) -> pa.Array:
    """Turn int64 nanoseconds back into the group's output ``Date`` type."""
    arr = pa.array(date_ns.view("datetime64[ns]"), DATE_NS)
    return arr.cast(date_type, safe=False) if date_type != DATE_NS else arr


def read_values(pf: pq.ParquetFile, row_group: int, path: str) -> np.ndarray:
    """One row group's ``value`` column as a float array (nulls become NaN)."""
    try:
        col = pf.read_row_group(row_group, columns=[VALUE_COLUMN]).column(0)
    except DECODE_ERRORS as exc:
        raise decode_error(exc, path, f"cannot decode 'value' in row group {row_group}") from None
    return col.to_numpy() if col.null_count == 0 else col.to_numpy(zero_copy_only=False)


def keys_strictly_sorted(paths: np.ndarray, dates: np.ndarray) -> bool:
    """True when keys are strictly increasing by (path, Date): sorted and unique.

    Compares neighbours rather than subtracting them, so extreme values cannot overflow.
    """
    if len(paths) < 2:
        return True
    p0, p1, d0, d1 = paths[:-1], paths[1:], dates[:-1], dates[1:]
    return bool(np.all((p1 > p0) | ((p1 == p0) & (d1 > d0))))


def stored_keys(pf: pq.ParquetFile, path: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The key columns as the file stores them (no trip through nanoseconds); nulls are DataErrors."""
    return key_columns(read_columns(pf, path, KEY_COLUMNS), path)


def date_order_view(dates: pa.Array) -> np.ndarray:
    """A zero-copy integer view of a date or timestamp array that orders as its dates do."""
    return dates.view(pa.int32() if dates.type.bit_width == 32 else pa.int64()).to_numpy()


def stored_keys_sorted(paths: pa.ChunkedArray, dates: pa.ChunkedArray, block_rows: int = 1 << 16) -> bool:
    """:func:`keys_strictly_sorted` over stored keys, a cache-sized block at a time.

    Same answer; several times faster on millions of rows, since the
    temporaries stay in cache instead of costing fresh pages each. Blocks and
    chunks overlap by one row, so every neighbouring pair is compared once.
    """
    if [len(c) for c in paths.chunks] != [len(c) for c in dates.chunks]:
        paths, dates = pa.chunked_array([paths.combine_chunks()]), pa.chunked_array([dates.combine_chunks()])
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for path_chunk, date_chunk in zip(paths.chunks, dates.chunks):
        p, d = path_chunk.to_numpy(), date_order_view(date_chunk)
        if not len(p):
            continue
        if previous is not None and not keys_strictly_sorted(np.concatenate([previous[0], p[:1]]),
                                                             np.concatenate([previous[1], d[:1]])):
            return False
        if not all(keys_strictly_sorted(p[i:i + block_rows + 1], d[i:i + block_rows + 1])
                   for i in range(0, len(p), block_rows)):
            return False
        previous = p[-1:], d[-1:]
    return True


def sort_keys(paths: np.ndarray, dates: np.ndarray, path: str) -> np.ndarray | None:
    """The permutation that sorts keys by (path, Date), or None if already sorted.

    Raises DataError on a duplicated (path, Date) key: the contract wants keys
    unique within a file.
    """
    if keys_strictly_sorted(paths, dates):
        return None
    order = np.lexsort((dates, paths))
    sp, sd = paths[order], dates[order]
    dup = (sp[1:] == sp[:-1]) & (sd[1:] == sd[:-1])
    if dup.any():
        i = int(np.argmax(dup))
        raise DataError(f"{path}: duplicated key (path={sp[i]}, Date={sd[i].astype('datetime64[ns]')})"
                        f" ({int(dup.sum())} duplicates)")
    return order



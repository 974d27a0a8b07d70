"""Atomic output files: written under a temporary name, fsynced, renamed into place.

A reader of the output directory sees either no file or the whole file, never a
partial one. Temporary names start with a dot and end in ``.tmp`` so they are
easy to sweep after a crash (:func:`sweep_temporaries`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from throttler import durable, storage
from throttler.cluster import worker_settings
from throttler.worker import contract, parquet_parts, state

TMP_SUFFIX = durable.TMP_SUFFIX
OUTPUT_MODE = 0o640  #: owner read-write, group read, nobody else
OUTPUT_SUFFIX = ".parquet"


def output_path_for(output_root: str | os.PathLike, group: str) -> str:
    """The one output file of ``group`` (the group ID is validated upstream)."""
    if storage.is_url(output_root):
        return storage.join(output_root, f"{group}{OUTPUT_SUFFIX}")
    return str(Path(storage.local_path(output_root)) / f"{group}{OUTPUT_SUFFIX}")


#: How outputs are encoded: sorted keys plain + zstd 1 (as small as a dictionary, half its CPU),
#: near-random sums plain and uncompressed (snappy saved no byte, for 40-57 ms a 6M-row output),
#: key statistics only, page checksums (see benchmarks/README.md).
WRITE_OPTIONS = {
    "use_dictionary": False,
    "compression": {"path": "zstd", "Date": "zstd", "value": "none"},
    "compression_level": {"path": 1, "Date": 1},
    "write_statistics": ["path", "Date"],
    "write_page_checksum": True,
}


def write_output(output_path: str, paths: np.ndarray, dates_ns: np.ndarray, values: np.ndarray,
                 date_type: pa.DataType | None) -> int:
    """Write (path, Date as ns, value) arrays atomically as ``Date`` of ``date_type``; returns bytes."""
    return write_table(output_path, output_table(pa.array(paths),
                                                 contract.ns_to_date_type(dates_ns, date_type or contract.DATE_NS),
                                                 values))


def output_table(paths: pa.Array | pa.ChunkedArray, dates: pa.Array | pa.ChunkedArray,
                 values: np.ndarray) -> pa.Table:
    """The output's three columns (``path`` int64, ``Date`` as given, ``value`` float64)."""
    return pa.table({"path": paths.cast(pa.int64()), "Date": dates, "value": pa.array(values, pa.float64())})


def write_table(output_path: str, table: pa.Table) -> int:
    """Write ``table`` atomically (:func:`throttler.durable.replacing`); returns bytes.

    Encoded in memory first, then written in one unbuffered loop: faster than
    the writer going page by page through a Python file object.
    """
    encoded = pa.BufferOutputStream()
    if state.state_of(output_path) is not None:  # the inputs' state goes into the same footer
        table = table.replace_schema_metadata(state.state_metadata(output_path, _finite(table)))
    pq.write_table(table, encoded, **WRITE_OPTIONS)
    data = memoryview(encoded.getvalue())
    if storage.is_url(output_path):
        return storage.write_object(output_path, data)
    with durable.replacing(output_path, OUTPUT_MODE) as fh:
        while data:
            data = data[fh.write(data):]
    return os.path.getsize(output_path)


def output_schema(date_type: pa.DataType) -> pa.Schema:
    """The output's schema, as :func:`output_table` builds it."""
    return pa.schema([("path", pa.int64()), ("Date", date_type), ("value", pa.float64())])


def write_tables(output_path: str, schema: pa.Schema, tables) -> int:
    """:func:`write_table` for a sequence of tables of ``schema`` (row groups of at
    most the writer's default 1,048,576 rows, as :func:`write_table` writes).

    The tables are encoded ``output_encode_threads`` at a time, each into a
    Parquet part in memory, and the parts written in order as one file
    (:mod:`throttler.worker.parquet_parts`): the final task's encoding, the
    group's last serial step, uses the cores the finished leaves left idle.
    Each part is written to the temporary file as its turn comes, so the writes
    overlap the encoding of the next ones and the caller preparing more. An
    object store output is put together in memory, then written with one PUT.
    """
    stateful = state.state_of(output_path) is not None  # the inputs' state goes into the same footer
    finite = [True]

    def note(table: pa.Table) -> None:
        if stateful and finite[0]:
            finite[0] = _finite(table)

    def footer_metadata() -> dict:
        return state.state_metadata(output_path, finite[0]) if stateful else {}

    threads = encode_threads()
    if storage.is_url(output_path):  # it appears whole or not at all
        encoded = pa.BufferOutputStream()
        parquet_parts.write_parts(encoded, schema, tables, WRITE_OPTIONS, threads, footer_metadata, note)
        return storage.write_object(output_path, memoryview(encoded.getvalue()))
    with durable.replacing(output_path, OUTPUT_MODE) as fh:
        parquet_parts.write_parts(fh, schema, tables, WRITE_OPTIONS, threads, footer_metadata, note,
                                  after_part=lambda: start_writeback(fh.fileno()))
    return os.path.getsize(output_path)


def encode_threads() -> int:
    """Output row groups a task encodes at once (the ``output_encode_threads`` worker setting)."""
    return worker_settings.configured("output_encode_threads")


def _finite(table: pa.Table) -> bool:
    """Every output value is finite (an output with NaN or inf is not extended incrementally)."""
    return pc.all(pc.is_finite(table.column("value"))).as_py() is not False


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing out what ``fd`` holds so far, without waiting.

    ``POSIX_FADV_DONTNEED`` starts writeback of dirty pages (and drops clean
    ones: outputs do not crowd the workers' page cache), so the closing fsync
    finds little left.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sweep_temporaries(output_root: str | os.PathLike, group: str | None = None) -> list[str]:
    """Remove temporary files left by tasks that died mid-write; returns their names.

    With ``group``, only that group's (called when its run ends: no attempt of
    it is writing any more); without, every one (at start, before any run).
    """
    pattern = re.compile(re.escape(f".{group}{OUTPUT_SUFFIX}.") + r"[0-9a-f]{12}" + re.escape(TMP_SUFFIX)) \
        if group else re.compile(r"\..*" + re.escape(TMP_SUFFIX))
    removed = []
    if storage.is_url(output_root):  # outputs are single PUTs; the temporaries are incremental runs'
        return _sweep_objects(str(output_root), group, pattern)  # private copies of previous outputs
    for entry in os.scandir(storage.local_path(output_root)):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            _unlink_quietly(entry.path)
            removed.append(entry.name)
    return removed


def _sweep_objects(output_root: str, group: str | None, pattern: re.Pattern) -> list[str]:
    """:func:`sweep_temporaries` on object storage: one listing of the names starting
    with ``.<group>.parquet.`` (or ``.``) in the output prefix, then one delete each."""
    removed = []
    for url in storage.list_prefixed(storage.join(output_root, f".{group}{OUTPUT_SUFFIX}." if group else ".")):
        name = url.rsplit("/", 1)[-1]
        if pattern.fullmatch(name):
            storage.delete_object(url)
            removed.append(name)
    return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

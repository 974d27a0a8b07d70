"""Parquet page checksums verified with a fast CRC-32, for the leaves' reads of local files.

A page's header may carry the CRC-32 (zlib's polynomial) of the bytes that
follow it. pyarrow verifies it when asked (``page_checksum_verification``), at
about 3 GB/s: on a shuffled 6M-row file (883 pages, 71 MB) its three-column read
took 84-99 ms with verification against 67-73 ms without, single-threaded on an
AMD EPYC VM. ISA-L's CRC-32 (the ``isal`` package: carry-less multiply, about
20 GB/s there, against 2.8 GB/s for the system zlib's) does the same check on the
same pages in 8-10 ms a file, page headers walked included.

So a ``dense`` leaf (and an ``aligned`` or ``sum`` task, where numba is loaded:
:func:`throttler.worker.contract.open_checked`) opens each local file without
pyarrow's verification and,
before pyarrow decodes the column chunks of a row group, checks them here:
:class:`CheckedParquetFile` maps the row group's byte range read-only (the page
cache's pages, no copy; unmapped before pyarrow reads them), a compiled loop
walks the page headers (Thrift compact, only the sizes and the CRC
interpreted, every other field skipped by type), and each page that carries a
CRC is compared with ISA-L's. A mismatch is a DataError naming the file, the
column, the row group and the page, as pyarrow's would be. Pages without a CRC
are not checked, as by pyarrow; in a file without any, the walk reads only the
headers (about 1 ms a file).

Memory: while a row group is checked, its chunks' encoded bytes are mapped
(file pages, counted in the worker's RSS); the mapping is closed before
pyarrow reads and decodes them, so it is never held beside that row group's
decoded table, which the memory model already counts (and is no larger).

Whatever this module cannot walk (a header it does not understand, sizes
running past the chunk, a file that changed size since its footer was read)
is left to pyarrow: the file is opened again with pyarrow's verification and
read that way, so an error is pyarrow's own and never a wrong sum. The same
holds where ``isal`` cannot be imported, and for files on an object store
(read through pyarrow's file systems, so checked by pyarrow).
"""

from __future__ import annotations

import mmap
import os

import numba
import numpy as np
import pyarrow.parquet as pq

from throttler import storage
from throttler.errors import DataError
from throttler.worker import contract

try:  # a declared dependency; without it pyarrow verifies, as before
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - exercised by the fallback test through FAST_CRC
    crc32 = None

#: whether this process can verify pages itself (``isal`` imported)
FAST_CRC = crc32 is not None

#: a page's entry in :func:`page_spans` when its header carries no CRC
NO_CRC = np.int64(1) << 40
#: :func:`page_spans`: the headers could not be walked (leave the chunk to pyarrow)
UNREADABLE = -1
#: :func:`page_spans`: more pages than the output array has rows (call again with more)
OUT_FULL = -2
#: deepest nesting of Thrift structs and lists a page header may have
MAX_DEPTH = 16

# Thrift compact protocol types (parquet.thrift's PageHeader uses all but maps)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
#: PageHeader's fields: 3 compressed_page_size (the bytes after the header), 4 crc
_COMPRESSED_SIZE_FIELD, _CRC_FIELD = 3, 4


@numba.njit(cache=True, nogil=True)
def _varint(buf, pos, end):
    """(value, position after it) of the unsigned varint at ``pos``; position -1 if cut short."""
    result, shift = np.int64(0), 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        result |= np.int64(b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    return np.int64(0), -1


_FRAME_STRUCT, _FRAME_LIST, _FRAME_MAP = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _skip(buf, pos, end, kind):
    """The position after a value of Thrift type ``kind`` at ``pos``; -1 if it cannot be skipped.

    Iterative, with its own stack of open structs, lists and maps: numba's disk
    cache cannot load a recursive function (the loaded code misses its own symbol).
    """
    frames = np.zeros((MAX_DEPTH, 4), np.int64)  # (frame type, values left, element/key type, value type)
    depth = 0
    while True:
        # the value of type ``kind`` at ``pos``: passed over, or opened as a frame
        if pos < 0 or pos > end:
            return -1
        if kind == _BYTE:
            pos += 1
        elif kind == _I16 or kind == _I32 or kind == _I64:
            _, pos = _varint(buf, pos, end)
        elif kind == _DOUBLE:
            pos += 8
        elif kind == _BINARY:
            n, pos = _varint(buf, pos, end)
            pos = -1 if pos < 0 else pos + n
        elif kind == _STRUCT or kind == _LIST or kind == _SET or kind == _MAP:
            if depth == MAX_DEPTH or pos >= end:
                return -1
            frame = frames[depth]
            depth += 1
            if kind == _STRUCT:
                frame[0] = _FRAME_STRUCT
            elif kind == _MAP:
                size, pos = _varint(buf, pos, end)
                frame[0], frame[1] = _FRAME_MAP, 2 * size
                if size > 0:
                    if pos < 0 or pos >= end:
                        return -1
                    frame[2], frame[3] = buf[pos] >> 4, buf[pos] & 0x0F
                    pos += 1
            else:
                b = buf[pos]
                pos += 1
                size = np.int64(b >> 4)
                if size == 15:
                    size, pos = _varint(buf, pos, end)
                frame[0], frame[1], frame[2] = _FRAME_LIST, size, b & 0x0F
        elif kind != _TRUE and kind != _FALSE:  # a struct field's boolean is in its type: no bytes
            return -1
        # the next value to pass over: from the innermost open frame
        while True:
            if pos < 0 or pos > end:
                return -1
            if depth == 0:
                return pos
            frame = frames[depth - 1]
            if frame[0] == _FRAME_STRUCT:
                if pos >= end:
                    return -1
                b = buf[pos]
                pos += 1
                if b == 0:
                    depth -= 1
                    continue
                if b >> 4 == 0:  # long form: the field id follows as a zigzag varint
                    _, pos = _varint(buf, pos, end)
                kind = b & 0x0F
                break
            if frame[1] == 0:
                depth -= 1
                continue
            frame[1] -= 1
            kind = frame[2] if frame[0] == _FRAME_LIST or frame[1] % 2 == 1 else frame[3]
            if kind == _TRUE or kind == _FALSE:  # an element's boolean is one byte
                pos += 1
                continue
            break


@numba.njit(cache=True, nogil=True)
def page_spans(buf, start, end, out):
    """Walk the pages of one column chunk, ``buf[start:end]``.

    Fills ``out[k]`` with page k's (first byte after its header, byte count,
    CRC or NO_CRC) and returns the number of pages; UNREADABLE when a header
    cannot be walked or a page runs past ``end``, OUT_FULL when ``out`` is too short.
    """
    n, pos = 0, start
    while pos < end:
        if n >= out.shape[0]:
            return OUT_FULL
        size, crc, last = np.int64(-1), NO_CRC, np.int64(0)
        while True:  # the PageHeader struct's fields
            if pos >= end:
                return UNREADABLE
            b = buf[pos]
            pos += 1
            if b == 0:
                break
            kind = b & 0x0F
            if b >> 4 == 0:
                z, pos = _varint(buf, pos, end)
                if pos < 0:
                    return UNREADABLE
                field = (z >> 1) ^ -(z & 1)
            else:
                field = last + (b >> 4)
            last = field
            if (field == _COMPRESSED_SIZE_FIELD or field == _CRC_FIELD) and kind == _I32:
                z, pos = _varint(buf, pos, end)
                if pos < 0:
                    return UNREADABLE
                value = (z >> 1) ^ -(z & 1)
                if field == _COMPRESSED_SIZE_FIELD:
                    size = value
                else:
                    crc = value & 0xFFFFFFFF
            else:
                pos = _skip(buf, pos, end, kind)
                if pos < 0:
                    return UNREADABLE
        if size < 0 or pos + size > end:
            return UNREADABLE
        out[n, 0], out[n, 1], out[n, 2] = pos, size, crc
        n += 1
        pos += size
    return n


def _load_signature() -> None:
    """Compile (or load from numba's disk cache) the walk for read-only byte arrays, at import."""
    readonly_bytes = numba.types.Array(numba.uint8, 1, "C", readonly=True)
    page_spans.compile((readonly_bytes, numba.int64, numba.int64, numba.int64[:, ::1]))


_load_signature()


class Unverifiable(Exception):
    """This module cannot walk the chunk's pages: pyarrow must verify the file."""


def chunk_range(column_chunk) -> tuple[int, int]:
    """(first byte, end) of a column chunk in its file: its dictionary page, if any, then its data pages."""
    start = column_chunk.data_page_offset
    if column_chunk.has_dictionary_page and 0 < column_chunk.dictionary_page_offset < start:
        start = column_chunk.dictionary_page_offset
    return start, start + column_chunk.total_compressed_size


def verify_chunks(fd: int, path: str, metadata, row_group: int, columns: list[int]) -> None:
    """Check every page CRC of ``columns`` (indices) of ``row_group``, read through ``fd``.

    A mismatch is a DataError naming the page; Unverifiable where the pages
    cannot be walked here.
    """
    meta = metadata.row_group(row_group)
    ranges = [chunk_range(meta.column(i)) for i in columns]
    ranges = [(i, lo, hi) for i, (lo, hi) in zip(columns, ranges) if hi > lo]
    if not ranges:
        return
    first, end = min(lo for _, lo, _ in ranges), max(hi for _, _, hi in ranges)
    base = first - first % mmap.ALLOCATIONGRANULARITY
    if first < 0 or end > os.fstat(fd).st_size:
        raise Unverifiable(f"{path}: column chunks past the file's end")
    mapped = mmap.mmap(fd, end - base, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
    try:
        problem = _mapped_problem(mapped, base, ranges, path, metadata, row_group)
    finally:
        _close(mapped)
    if problem is not None:  # raised once the mapping is closed: nothing refers to its pages
        raise problem


def _close(mapped: mmap.mmap) -> None:
    """Unmap now, or, while something still holds a view of the mapping, once it lets go.

    Dask's statistical profiler (a worker thread sampling every thread's stack
    every 10 ms) keeps the frames it sampled for a moment; a frame of
    :func:`_spans` it holds keeps that call's view of the mapping alive after the
    call returned, and ``close`` then raises ``BufferError`` (seen once in the
    admission tests: a group's attempt failed with "cannot close exported pointers exist"). The
    mapping is read-only and is unmapped when its last view is freed.
    """
    try:
        mapped.close()
    except BufferError:
        pass


def _mapped_problem(mapped: mmap.mmap, base: int, ranges, path: str, metadata, row_group: int) -> Exception | None:
    """The DataError of the first page whose CRC does not match, Unverifiable, or None.

    Returned, not raised: a traceback would keep views of the mapping alive, and
    a mapping with views cannot be closed.
    """
    data = memoryview(mapped)
    array = np.frombuffer(mapped, np.uint8)
    try:
        for column, lo, hi in ranges:
            spans = _spans(array, lo - base, hi - base)
            if spans is None:
                return Unverifiable(f"{path}: a page header this module cannot walk")
            for page, (at, size, crc) in enumerate(spans):
                if crc != NO_CRC and crc32(data[at:at + size]) != crc:
                    name = metadata.schema.column(column).path
                    return DataError(f"{path}: CRC checksum verification failed for column '{name}', row group"
                                     f" {row_group}, page {page}: the file is corrupt")
        return None
    finally:
        del array
        data.release()


def _spans(array: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """:func:`page_spans` of ``array[lo:hi]`` as an array of rows; None where it cannot be walked."""
    rows = max(16, (hi - lo) // 4096)
    while True:
        out = np.empty((rows, 3), np.int64)
        n = page_spans(array, lo, hi, out)
        if n == OUT_FULL:
            rows *= 4
            continue
        return None if n < 0 else out[:n]


class CheckedParquetFile:
    """A local Parquet file opened without pyarrow's page verification, whose reads check pages here.

    Every read (``read_row_group``, ``read``, ``iter_batches``) first checks
    the row groups and columns it will decode, once each; everything else is
    the ``pyarrow.parquet.ParquetFile``'s. Where this module cannot walk a
    chunk, the file is opened again with pyarrow's verification and every read
    from then on goes through that.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._pf = contract.open_parquet(path, verify_pages=False)
        except BaseException:
            self.close()
            raise
        self._checked: set[tuple[int, int]] = set()
        self._pyarrow_verifies = False

    def __getattr__(self, name):
        if name.startswith("_"):  # this object's own, not set yet (a failed __init__)
            raise AttributeError(name)
        return getattr(self._pf, name)

    def __del__(self):
        self.close()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def read_row_group(self, i: int, columns=None, **kwargs):
        self._check([i], columns)
        return self._pf.read_row_group(i, columns=columns, **kwargs)

    def read(self, columns=None, **kwargs):
        self._check(range(self._pf.metadata.num_row_groups), columns)
        return self._pf.read(columns=columns, **kwargs)

    def iter_batches(self, batch_size=65536, row_groups=None, columns=None, **kwargs):
        self._check(range(self._pf.metadata.num_row_groups) if row_groups is None else row_groups, columns)
        return self._pf.iter_batches(batch_size=batch_size, row_groups=row_groups, columns=columns, **kwargs)

    def _check(self, row_groups, columns) -> None:
        if self._pyarrow_verifies:
            return
        indices = self._column_indices(columns)
        try:
            for rg in row_groups:
                todo = [c for c in indices if (rg, c) not in self._checked]
                if todo:
                    verify_chunks(self._fd, self.path, self._pf.metadata, rg, todo)
                    self._checked.update((rg, c) for c in todo)
        except Unverifiable:
            self._pf = contract.open_parquet(self.path)  # pyarrow verifies (and names what is wrong)
            self._pyarrow_verifies = True
            self.close()

    def _column_indices(self, columns) -> list[int]:
        schema = self._pf.metadata.schema
        if columns is None:
            return list(range(len(schema)))
        wanted = set(columns)
        return [i for i in range(len(schema)) if schema.column(i).path.split(".")[0] in wanted]


def open_checked(path: str) -> pq.ParquetFile | CheckedParquetFile:
    """``path`` opened for reading with its pages verified: here where possible, else by pyarrow."""
    if not FAST_CRC or storage.is_url(path):
        return contract.open_parquet(path)
    try:
        return CheckedParquetFile(path)
    except OSError:
        return contract.open_parquet(path)  # pyarrow's own error (file not found, not Parquet ...)


#: set last: the module is whole (a thread that finds it in ``sys.modules`` while another thread is
#: still importing it must not use it: :func:`throttler.worker.contract.open_checked`)
LOADED = True

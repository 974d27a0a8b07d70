"""One Parquet file from row groups encoded at once in threads: each a Parquet part in memory, stitched.

pyarrow's writer encodes a file's row groups one after the other on one
thread (``OMP_NUM_THREADS=1`` in a Dask worker, and the writer has no option
to encode in parallel). A final task's encoding is the group's last, serial
step, while the other cores wait. Here each output table is encoded by
``pq.write_table`` into a complete Parquet file in memory (a *part*: pyarrow
releases the GIL while it encodes), up to ``threads`` parts at once, and the
parts are written out in order as one file: the magic, each part's body (its
pages, as encoded: page checksums and statistics are the writer's own), and
one footer whose row groups are the parts' with their file offsets moved by
where each body landed.

The footer is Thrift compact protocol (parquet.thrift ``FileMetaData``). It is
decoded to a tree of (field id, type, value) and encoded back byte for byte
(:mod:`throttler.worker.thrift_compact`) (tests check the round trip against pyarrow's footers); only offsets,
row-group ordinals, the row count and the key-value metadata are changed.
A part holding a page index (offset index offsets) is refused: its offsets
live outside the footer. Nothing here decodes or re-encodes a page.
"""

from __future__ import annotations

import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from throttler.worker import thrift_compact
from throttler.worker.thrift_compact import BINARY, LIST, STRUCT

MAGIC = b"PAR1"

# parquet.thrift field ids
_FMD_NUM_ROWS, _FMD_ROW_GROUPS, _FMD_KEY_VALUE = 3, 4, 5
_RG_COLUMNS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 5, 7
_CC_FILE_OFFSET, _CC_META, _CC_OFFSET_INDEX, _CC_COLUMN_INDEX = 2, 3, 4, 6
_CMD_OFFSETS = (9, 10, 11, 14)  # data, index, dictionary page offsets; bloom filter offset
_KV_KEY, _KV_VALUE = 1, 2


class PartError(ValueError):
    """A part cannot be stitched (not a Parquet file, or a layout handled nowhere here)."""


def decode_file_metadata(footer: bytes) -> list:
    """A footer's ``FileMetaData`` as a tree of [field id, type, value] (values decoded, lists as
    (element type, items)); :func:`encode_file_metadata` gives the same bytes back."""
    decoder = thrift_compact.Decoder(footer)
    try:
        tree = decoder.struct()
    except thrift_compact.ThriftError as exc:
        raise PartError(f"cannot decode the footer ({exc})") from None
    if decoder.pos != len(footer):
        raise PartError("bytes after the footer's FileMetaData")
    return tree


def encode_file_metadata(tree: list) -> bytes:
    return thrift_compact.encode_struct(tree)


def _field(fields: list, fid: int):
    for field in fields:
        if field[0] == fid:
            return field
    return None


# --------------------------------------------------------------------------- parts and the stitched file


def footer_of(part: bytes | memoryview) -> tuple[bytes, int]:
    """A Parquet file's footer bytes and where its body ends (the footer's start)."""
    view = memoryview(part)
    if len(view) < 12 or view[:4] != MAGIC or view[-4:] != MAGIC:
        raise PartError("not a Parquet file (no PAR1 magic at both ends)")
    length = struct.unpack("<I", view[-8:-4])[0]
    start = len(view) - 8 - length
    if start < 4:
        raise PartError("footer length runs past the file's start")
    return bytes(view[start:len(view) - 8]), start


def _moved_row_group(row_group: list, shift: int, ordinal: int) -> list:
    """``row_group``'s offsets moved by ``shift`` bytes, its ordinal set (in place; returned)."""
    for field in row_group:
        if field[0] == _RG_FILE_OFFSET:
            field[2] += shift
        elif field[0] == _RG_ORDINAL:
            field[2] = ordinal
        elif field[0] == _RG_COLUMNS:
            for column in field[2][1]:
                _move_column(column, shift)
    return row_group


def _move_column(column: list, shift: int) -> None:
    for field in column:
        if field[0] in (_CC_OFFSET_INDEX, _CC_COLUMN_INDEX):
            raise PartError("a part with a page index: its offsets are outside the footer")
        if field[0] == _CC_FILE_OFFSET and field[2]:  # deprecated; writers that leave it 0 keep 0
            field[2] += shift
        elif field[0] == _CC_META:
            for meta in field[2]:
                if meta[0] in _CMD_OFFSETS:
                    meta[2] += shift


class Stitcher:
    """Writes parts' bodies to ``sink`` in order, then one footer over all their row groups."""

    def __init__(self, sink: BinaryIO, after_part=None):
        self.sink, self.offset, self.after_part = sink, 0, after_part
        self.metadata: list | None = None
        self.row_groups: list = []
        self.rows = 0
        self._write(MAGIC)

    def _write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[self.sink.write(view):]
        self.offset += len(data)

    def add(self, part: bytes | memoryview) -> None:
        footer, body_end = footer_of(part)
        tree = decode_file_metadata(footer)
        shift = self.offset - len(MAGIC)  # the part's byte 4 lands at self.offset
        groups = _field(tree, _FMD_ROW_GROUPS)
        for group in (groups[2][1] if groups else []):
            self.row_groups.append(_moved_row_group(group, shift, len(self.row_groups)))
        self.rows += _field(tree, _FMD_NUM_ROWS)[2]
        if self.metadata is None:
            self.metadata = tree
        self._write(memoryview(part)[len(MAGIC):body_end])
        if self.after_part is not None:
            self.after_part()

    def finish(self, key_value_metadata: dict | None = None) -> None:
        """Write the footer: the first part's metadata with every part's row groups and ``key_value_metadata``
        added (a key already there takes the new value)."""
        if self.metadata is None:
            raise PartError("no part was added")
        tree = [list(f) for f in self.metadata]
        _field(tree, _FMD_NUM_ROWS)[2] = self.rows
        groups = _field(tree, _FMD_ROW_GROUPS)
        groups[2] = (groups[2][0], self.row_groups)
        if key_value_metadata:
            _set_key_values(tree, key_value_metadata)
        footer = encode_file_metadata(tree)
        self._write(footer + struct.pack("<I", len(footer)) + MAGIC)


def _set_key_values(tree: list, extra: dict) -> None:
    extra = {_as_bytes(k): _as_bytes(v) for k, v in extra.items()}
    field = _field(tree, _FMD_KEY_VALUE)
    if field is None:
        field = [_FMD_KEY_VALUE, LIST, (STRUCT, [])]
        tree.append(field)
        tree.sort(key=lambda f: f[0])
    items = [kv for kv in field[2][1] if bytes(_field(kv, _KV_KEY)[2]) not in extra]
    items += [[[_KV_KEY, BINARY, k], [_KV_VALUE, BINARY, v]] for k, v in extra.items()]
    field[2] = (STRUCT, items)


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else bytes(text)


#: Room a part's buffer leaves beyond the table's decoded bytes: page headers, statistics, the footer.
PART_SLACK_BYTES = 1 << 20


def part_bound_bytes(table: pa.Table) -> int:
    """Bytes that hold ``table`` encoded without a dictionary (plain pages, compressed or not; zstd
    grows incompressible data by under 1%); a larger part falls back to a growing stream."""
    return table.nbytes + table.nbytes // 64 + PART_SLACK_BYTES


def encode_part(table: pa.Table, schema: pa.Schema, write_options: dict, buffer: pa.Buffer | None = None) -> pa.Buffer:
    """``table`` as a complete Parquet file in memory (pyarrow encodes without the GIL).

    Encoded into ``buffer`` (a slice of it is returned) when it is large enough, else into a
    stream that grows by copying itself: the growing cost a fresh mapping and a copy at every
    doubling, and a buffer used again for the next part is already mapped.
    """
    table = table.cast(schema) if table.schema != schema else table
    if buffer is not None and buffer.size >= part_bound_bytes(table):
        writer = pa.FixedSizeBufferWriter(buffer)
        try:
            pq.write_table(table, writer, **write_options)
            return buffer.slice(0, writer.tell())
        except OSError:  # "Write out of bounds": a dictionary page made it larger than the bound
            pass
    encoded = pa.BufferOutputStream()
    pq.write_table(table, encoded, **write_options)
    return encoded.getvalue()


def write_parts(sink: BinaryIO, schema: pa.Schema, tables: Iterable[pa.Table], write_options: dict,
                threads: int, key_value_metadata=None, on_table=None, after_part=None) -> int:
    """Encode ``tables`` into parts, ``threads`` at a time, and write them to ``sink`` as one file, in order.

    At most ``threads`` tables are being encoded or held as parts at once, each into a buffer of
    its own (:func:`encode_part`), reused for a later part once its part is written.
    ``on_table(table)`` is called for each table as it is handed to a thread, ``after_part()``
    after each part's body is written; ``key_value_metadata`` (a dict, or a callable called after
    the last part) goes into the footer. With no table, the file is pyarrow's empty file of
    ``schema``. Returns bytes written.
    """
    stitcher = Stitcher(sink, after_part)
    spare: list[pa.Buffer] = []  #: buffers whose part has been written, for the next parts

    def write_oldest() -> None:
        future, buffer = pending.popleft()
        stitcher.add(future.result())
        spare.append(buffer)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="throttler-encode") as pool:
        pending: deque = deque()
        try:
            for table in tables:
                if on_table is not None:
                    on_table(table)
                buffer = _buffer_for(table, spare)
                pending.append((pool.submit(encode_part, table, schema, write_options, buffer), buffer))
                if len(pending) >= max(1, threads):  # the oldest is written while the others encode
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            for future, _ in pending:
                future.cancel()
    if stitcher.metadata is None:
        stitcher.add(encode_part(schema.empty_table(), schema, write_options))
    extra = key_value_metadata() if callable(key_value_metadata) else key_value_metadata
    stitcher.finish(extra)
    return stitcher.offset


def _buffer_for(table: pa.Table, spare: list[pa.Buffer]) -> pa.Buffer:
    """A spare buffer that holds ``table``'s part, else a new one (its pages mapped as they are written)."""
    bound = part_bound_bytes(table)
    for i, buffer in enumerate(spare):
        if buffer.size >= bound:
            return spare.pop(i)
    return pa.allocate_buffer(bound)


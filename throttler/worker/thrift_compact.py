"""Thrift compact protocol, the encoding of Parquet's footer and page headers (parquet.thrift).

pyarrow exposes neither a page header nor a way to write a footer of our own,
so the two places that need them decode the bytes here:
:mod:`throttler.worker.pages` reads a dictionary page's header, and
:mod:`throttler.worker.parquet_parts` decodes parts' footers and encodes the
stitched file's. A struct decodes to a list of ``[field id, type, value]``
(values decoded; lists and sets as ``(element type, items)``, maps as
``(key type << 4 | value type, [(key, value), ...])``); :func:`encode_struct`
gives the same bytes back, which the tests check against pyarrow's footers.
"""

from __future__ import annotations

# compact protocol types
TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)


class ThriftError(ValueError):
    """The bytes are not the Thrift compact encoding expected (cut short, or an unknown type)."""


class Decoder:
    """Reads values from ``buf`` from position 0 on; ``pos`` is how far it got."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise ThriftError("the bytes end inside a value")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self):
        """(field id, type) of one struct's fields, until its stop byte; the caller reads or skips each value."""
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            yield last, kind

    def skip(self, kind: int) -> None:
        """Pass over a struct field's value of ``kind`` (a boolean field's value is in its type)."""
        if kind not in (TRUE, FALSE):
            self.value(kind)

    def value(self, kind: int):
        """One value of ``kind`` (a boolean as a list element takes one byte)."""
        if kind in (TRUE, FALSE):
            return self.byte() == TRUE
        if kind == BYTE:
            return self.byte()
        if kind in (I16, I32, I64):
            return self.zigzag()
        if kind in (DOUBLE, BINARY):
            size = 8 if kind == DOUBLE else self.varint()  # read first: ``self.pos += ...`` would add to the old pos
            if self.pos + size > len(self.buf):
                raise ThriftError("the bytes end inside a value")
            self.pos += size
            return self.buf[self.pos - size:self.pos]
        if kind in (LIST, SET):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            element = head & 0x0F
            return (element, [self.value(element) for _ in range(size)])
        if kind == MAP:
            size = self.varint()
            types = self.byte() if size else 0
            return (types, [(self.value(types >> 4), self.value(types & 0x0F)) for _ in range(size)])
        if kind == STRUCT:
            return self.struct()
        raise ThriftError(f"unknown Thrift type {kind}")

    def struct(self) -> list:
        """One struct as ``[[field id, type, value], ...]``."""
        return [[fid, kind, kind == TRUE if kind in (TRUE, FALSE) else self.value(kind)]
                for fid, kind in self.fields()]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def encode_value(kind: int, value) -> bytes:
    if kind in (TRUE, FALSE):
        return bytes([TRUE if value else FALSE])
    if kind == BYTE:
        return bytes([value])
    if kind in (I16, I32, I64):
        return _zigzag(value)
    if kind == DOUBLE:
        return bytes(value)
    if kind == BINARY:
        return _varint(len(value)) + bytes(value)
    if kind in (LIST, SET):
        element, items = value
        head = bytes([len(items) << 4 | element]) if len(items) < 15 else bytes([0xF0 | element]) + _varint(
            len(items))
        return head + b"".join(encode_value(element, item) for item in items)
    if kind == MAP:
        types, items = value
        if not items:
            return b"\x00"
        return _varint(len(items)) + bytes([types]) + b"".join(
            encode_value(types >> 4, k) + encode_value(types & 0x0F, v) for k, v in items)
    if kind == STRUCT:
        return encode_struct(value)
    raise ThriftError(f"unknown Thrift type {kind}")


def encode_struct(fields: list) -> bytes:
    """The bytes of a struct given as :meth:`Decoder.struct` returns it."""
    out, last = bytearray(), 0
    for fid, kind, value in fields:
        wire = (TRUE if value else FALSE) if kind in (TRUE, FALSE) else kind
        delta = fid - last
        out += bytes([delta << 4 | wire]) if 0 < delta <= 15 else bytes([wire]) + _zigzag(fid)
        if kind not in (TRUE, FALSE):
            out += encode_value(kind, value)
        last = fid
    out.append(0)
    return bytes(out)

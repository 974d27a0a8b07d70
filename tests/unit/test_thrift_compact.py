"""Thrift compact protocol: every type round-trips, skipping lands where decoding does, short bytes are refused."""

import pytest

from throttler.worker import thrift_compact as tc

#: one struct of every type: field ids in order, one jump past 15 (a long field header), negative values
EVERY_TYPE = [
    [1, tc.TRUE, True],
    [2, tc.FALSE, False],
    [3, tc.BYTE, 7],
    [4, tc.I16, -300],
    [5, tc.I32, 2**31 - 1],
    [6, tc.I64, -(2**63)],
    [7, tc.DOUBLE, b"\x00\x00\x00\x00\x00\x00\xf0\x3f"],
    [8, tc.BINARY, b"path"],
    [9, tc.LIST, (tc.TRUE, [True, False, True])],  # booleans as list elements take a byte each
    [10, tc.LIST, (tc.I64, list(range(-20, 20)))],  # 40 items: the long list header
    [11, tc.SET, (tc.BINARY, [b"a", b""])],
    [12, tc.MAP, (tc.BINARY << 4 | tc.I32, [(b"k", 1), (b"l", -1)])],
    [13, tc.MAP, (0, [])],
    [40, tc.STRUCT, [[1, tc.I32, 5], [2, tc.STRUCT, []], [3, tc.TRUE, True]]],
]


def test_every_type_round_trips():
    encoded = tc.encode_struct(EVERY_TYPE)
    decoder = tc.Decoder(encoded + b"tail")
    assert decoder.struct() == EVERY_TYPE
    assert decoder.pos == len(encoded)


def test_skipping_every_field_lands_where_decoding_ends():
    encoded = tc.encode_struct(EVERY_TYPE)
    decoder = tc.Decoder(encoded)
    seen = []
    for fid, kind in decoder.fields():
        seen.append(fid)
        decoder.skip(kind)
    assert seen == [f[0] for f in EVERY_TYPE]
    assert decoder.pos == len(encoded)


@pytest.mark.parametrize("cut", [1, 5, 17, 40, -2])
def test_bytes_cut_short_are_refused(cut):
    encoded = tc.encode_struct(EVERY_TYPE)
    with pytest.raises(tc.ThriftError, match="end inside a value"):
        tc.Decoder(encoded[:cut]).struct()


def test_unknown_type_is_refused():
    with pytest.raises(tc.ThriftError, match="unknown Thrift type 13"):
        tc.Decoder(bytes([0x1D, 0])).struct()  # field 1 of type 13

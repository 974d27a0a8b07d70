"""Row groups encoded as separate Parquet parts and stitched into one file (throttler/worker/parquet_parts.py).

Checked against pyarrow's own writer and reader, and against DuckDB's reader
(another implementation of the format, which reads the stitched footer's
offsets without pyarrow's help).
"""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from throttler.worker import output, parquet_parts
from throttler.worker.output import WRITE_OPTIONS

SCHEMA = pa.schema([("path", pa.int64()), ("Date", pa.timestamp("ns")), ("value", pa.float64())])


def _tables(n_tables: int, rows: int, seed: int = 0) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    tables, first = [], 0
    for _ in range(n_tables):
        paths = np.repeat(np.arange(first, first + rows // 4, dtype=np.int64), 4)
        dates = np.tile(np.array([0, 7, 31, 400], dtype="datetime64[D]").astype("datetime64[ns]"), rows // 4)
        values = rng.standard_normal(len(paths))
        values[::97] = np.nan
        tables.append(pa.table({"path": paths, "Date": dates, "value": values}, schema=SCHEMA))
        first += rows // 4
    return tables


def _assert_same(got: pa.Table, expected: pa.Table) -> None:
    """Equal columns, NaN equal to NaN (``Table.equals`` holds NaN unequal to itself)."""
    assert got.schema.remove_metadata() == expected.schema.remove_metadata()
    for name in expected.column_names:
        np.testing.assert_array_equal(got.column(name).to_numpy(), expected.column(name).to_numpy())


def _stitched(tables, threads: int, metadata=None) -> bytes:
    sink = io.BytesIO()
    parquet_parts.write_parts(sink, SCHEMA, iter(tables), WRITE_OPTIONS, threads, metadata)
    return sink.getvalue()


def _footer(data: bytes) -> bytes:
    return parquet_parts.footer_of(data)[0]


@pytest.mark.parametrize("options", [
    WRITE_OPTIONS,
    {},  # pyarrow's defaults: dictionary pages, snappy, statistics on every column
    {"write_statistics": False, "compression": "zstd", "row_group_size": 1_000},
    {"use_dictionary": True, "data_page_version": "2.0", "write_page_checksum": True},
])
def test_footers_decode_and_encode_back_to_the_same_bytes(options):
    table = pa.concat_tables(_tables(3, 4_000)).replace_schema_metadata({"a": "1", "ä": "ü" * 300})
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    footer = _footer(sink.getvalue())
    assert parquet_parts.encode_file_metadata(parquet_parts.decode_file_metadata(footer)) == footer


def test_the_stitched_file_reads_as_its_tables_in_order_with_checksums_and_statistics():
    tables = _tables(5, 40_000)
    data = _stitched(tables, threads=2)
    pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    assert pf.metadata.num_row_groups == 5
    assert pf.metadata.num_rows == 200_000
    _assert_same(pf.read(), pa.concat_tables(tables))
    for i, table in enumerate(tables):
        stats = pf.metadata.row_group(i).column(0).statistics
        assert (stats.min, stats.max) == (table.column("path")[0].as_py(), table.column("path")[-1].as_py())
        _assert_same(pf.read_row_group(i), table)


def test_duckdb_reads_the_stitched_file(tmp_path):
    tables = _tables(4, 20_000)
    target = tmp_path / "stitched.parquet"
    target.write_bytes(_stitched(tables, threads=3))
    expected = pa.concat_tables(tables).to_pandas()
    got = duckdb.sql(f"SELECT count(*), count(value) FILTER (WHERE NOT isnan(value)), min(path), max(path),"
                     f" sum(value) FILTER (WHERE NOT isnan(value)) FROM '{target}'").fetchall()[0]
    assert got[:4] == (80_000, int(expected["value"].notna().sum()), 0, 19_999)
    assert got[4] == pytest.approx(float(np.nansum(expected["value"])), rel=1e-12)
    ordered = duckdb.sql(f"SELECT path, Date, value FROM '{target}'").fetch_arrow_table()
    assert ordered.column("path").to_numpy().tolist() == expected["path"].tolist()


def test_the_file_is_the_same_bytes_whatever_the_number_of_threads():
    tables = _tables(6, 30_000, seed=3)
    one = _stitched(tables, threads=1)
    assert _stitched(tables, threads=2) == one
    assert _stitched(tables, threads=4) == one


def test_key_value_metadata_is_added_and_replaces_a_key_already_there():
    tables = [t.replace_schema_metadata({"kept": "old", "replaced": "old"}) for t in _tables(2, 1_000)]
    schema = tables[0].schema
    sink = io.BytesIO()
    parquet_parts.write_parts(sink, schema, iter(tables), WRITE_OPTIONS, 2,
                              lambda: {b"replaced": b"new", "added": "yes"})
    meta = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata.metadata
    assert meta[b"kept"] == b"old"
    assert meta[b"replaced"] == b"new"
    assert meta[b"added"] == b"yes"


def test_no_table_gives_an_empty_file_of_the_schema():
    pf = pq.ParquetFile(pa.BufferReader(_stitched([], threads=2)))
    assert pf.metadata.num_rows == 0
    assert pf.schema_arrow.remove_metadata() == SCHEMA
    assert pf.read().num_rows == 0


def test_a_part_with_a_page_index_is_refused():
    with pytest.raises(parquet_parts.PartError, match="page index"):
        parquet_parts.write_parts(io.BytesIO(), SCHEMA, iter(_tables(2, 1_000)),
                                  {**WRITE_OPTIONS, "write_page_index": True}, 2)


def test_bytes_that_are_not_parquet_are_refused():
    with pytest.raises(parquet_parts.PartError, match="PAR1"):
        parquet_parts.Stitcher(io.BytesIO()).add(b"PAR1 not a footer")
    with pytest.raises(parquet_parts.PartError, match="footer length"):
        parquet_parts.Stitcher(io.BytesIO()).add(b"PAR1" + b"\xff\xff\x00\x00" + b"PAR1")


def test_a_footer_cut_short_is_refused_as_a_part_error():
    footer = _footer(_stitched(_tables(2, 1_000), 1))
    with pytest.raises(parquet_parts.PartError, match="cannot decode the footer"):
        parquet_parts.decode_file_metadata(footer[:len(footer) // 2])


def test_a_part_encoded_into_a_buffer_is_the_bytes_of_one_encoded_into_a_stream():
    table = _tables(1, 50_000)[0]
    buffer = pa.allocate_buffer(parquet_parts.part_bound_bytes(table))
    assert parquet_parts.encode_part(table, SCHEMA, WRITE_OPTIONS, buffer).to_pybytes() == \
        parquet_parts.encode_part(table, SCHEMA, WRITE_OPTIONS).to_pybytes()


def test_a_part_larger_than_its_buffer_falls_back_to_a_stream(monkeypatch):
    table = _tables(1, 50_000)[0]
    expected = parquet_parts.encode_part(table, SCHEMA, WRITE_OPTIONS).to_pybytes()
    monkeypatch.setattr(parquet_parts, "part_bound_bytes", lambda t: 4_096)  # the buffer is taken, then overflows
    assert parquet_parts.encode_part(table, SCHEMA, WRITE_OPTIONS, pa.allocate_buffer(4_096)).to_pybytes() == expected


def test_parts_reuse_the_buffers_of_parts_already_written(monkeypatch):
    allocated = []
    real = pa.allocate_buffer
    monkeypatch.setattr(parquet_parts.pa, "allocate_buffer", lambda size: allocated.append(size) or real(size))
    tables = _tables(6, 20_000)
    data = _stitched(tables, 2)
    assert len(allocated) == 2  # one a thread, the others taken back once their part was written
    _assert_same(pq.read_table(io.BytesIO(data)), pa.concat_tables(tables))


def test_an_error_while_preparing_tables_reaches_the_caller():
    def tables():
        yield from _tables(3, 1_000)
        raise RuntimeError("the grid could not be added")

    with pytest.raises(RuntimeError, match="could not be added"):
        parquet_parts.write_parts(io.BytesIO(), SCHEMA, tables(), WRITE_OPTIONS, 2)


def test_a_corrupted_page_of_the_stitched_file_fails_its_checksum():
    data = bytearray(_stitched(_tables(3, 20_000), threads=2))
    column = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata.row_group(2).column(2)
    data[column.data_page_offset + 200] ^= 0xFF  # inside the last row group's first value page
    pf = pq.ParquetFile(pa.BufferReader(bytes(data)), page_checksum_verification=True)
    pf.read_row_group(0)
    with pytest.raises(OSError, match="(?i)crc|checksum"):
        pf.read_row_group(2)


def test_write_tables_output_is_the_same_bytes_with_one_or_two_encode_threads(tmp_path, monkeypatch):
    tables = _tables(4, 10_000, seed=7)
    files = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("THROTTLER_OUTPUT_ENCODE_THREADS", threads)
        target = str(tmp_path / f"out-{threads}.parquet")
        assert output.write_tables(target, SCHEMA, iter(tables)) == len(open(target, "rb").read())
        files[threads] = open(target, "rb").read()
    assert files["1"] == files["2"]
    _assert_same(pq.read_table(str(tmp_path / "out-2.parquet")), pa.concat_tables(tables))

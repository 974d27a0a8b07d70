"""Page CRCs checked with ISA-L: the walk agrees with an independent decoder, every corrupt page is caught
with pyarrow, and whatever cannot be walked is left to pyarrow."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from throttler.cluster.snapshot import NUMBA_PRELOAD_MIN_LIMIT_BYTES
from throttler.errors import DataError
from throttler.worker import dense, kernels, page_checks, thrift_compact as tc
from throttler.worker.page_checks import NO_CRC, OUT_FULL, UNREADABLE, CheckedParquetFile

from tests.unit.test_thrift_compact import EVERY_TYPE

ROWS = 30_000


def _table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    paths, dates = np.divmod(order, 12)
    return pa.table({"path": pa.array(paths, pa.int64()),
                     "Date": pa.array((dates * 30).astype("int32"), pa.date32()),
                     "value": pa.array(rng.standard_normal(rows))})


#: writer settings users meet: pyarrow's defaults plus checksums, data pages v2, no compression, zstd,
#: no dictionary, no statistics, many small pages and row groups
WRITERS = {
    "snappy v1": {},
    "data pages v2": {"data_page_version": "2.0"},
    "uncompressed": {"compression": "none"},
    "zstd, no dictionary": {"compression": "zstd", "use_dictionary": False},
    "no statistics": {"write_statistics": False},
    "small pages": {"data_page_size": 2048, "row_group_size": 7_000},
    "page index": {"write_page_index": True},
}


def _sorted_table(rows: int = ROWS) -> pa.Table:
    """Keys sorted by (path, Date), as the aligned strategy's output takes them from its reference."""
    paths, dates = np.divmod(np.arange(rows), 12)
    return pa.table({"path": pa.array(paths, pa.int64()),
                     "Date": pa.array((dates * 30).astype("int32"), pa.date32()),
                     "value": pa.array(np.random.default_rng(1).standard_normal(rows))})


def _write(path, table=None, **options) -> str:
    options.setdefault("row_group_size", 10_000)
    pq.write_table(_table() if table is None else table, path, write_page_checksum=True, **options)
    return str(path)


def _pages_by_decoder(data: bytes, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(data start, size, CRC or NO_CRC) of each page, walked with the Python Thrift decoder."""
    pages, pos = [], lo
    while pos < hi:
        decoder = tc.Decoder(data[pos:hi])
        header = {fid: value for fid, _, value in decoder.struct()}
        start = pos + decoder.pos
        crc = header[4] & 0xFFFFFFFF if 4 in header else NO_CRC
        pages.append((start, header[3], crc))
        pos = start + header[3]
    return pages


@pytest.mark.parametrize("writer", WRITERS)
def test_the_walk_finds_every_page_the_thrift_decoder_finds(tmp_path, writer):
    path = _write(tmp_path / "f.parquet", **WRITERS[writer])
    data = open(path, "rb").read()
    array = np.frombuffer(data, np.uint8)
    md = pq.ParquetFile(path).metadata
    walked = 0
    for rg in range(md.num_row_groups):
        for column in range(md.num_columns):
            lo, hi = page_checks.chunk_range(md.row_group(rg).column(column))
            spans = page_checks._spans(array, lo, hi)
            expected = _pages_by_decoder(data, lo, hi)
            assert [tuple(map(int, s)) for s in spans] == expected
            assert all(crc != NO_CRC for _, _, crc in expected)  # the writer put a CRC on every page
            walked += len(expected)
    assert walked >= 3 * md.num_row_groups


@pytest.mark.parametrize("writer", WRITERS)
def test_a_checked_file_reads_what_pyarrow_reads(tmp_path, writer):
    path = _write(tmp_path / "f.parquet", **WRITERS[writer])
    checked = page_checks.open_checked(path)
    assert isinstance(checked, CheckedParquetFile)
    assert checked.read().equals(pq.read_table(path))
    assert not checked._pyarrow_verifies
    md = checked.metadata
    assert checked._checked == {(rg, c) for rg in range(md.num_row_groups) for c in range(3)}


def test_a_view_of_the_mapping_held_past_the_check_does_not_fail_the_read(tmp_path, monkeypatch):
    """Dask's profiler may hold a sampled frame of the page walk, and with it a view of the mapping, when
    the check closes it: the read goes on and the mapping goes once the view does."""
    import gc
    import weakref

    path = _write(tmp_path / "f.parquet")
    held, real = [], page_checks._spans
    monkeypatch.setattr(page_checks, "_spans", lambda array, lo, hi: (held.append(array), real(array, lo, hi))[1])
    checked = page_checks.open_checked(path)
    assert checked.read().equals(pq.read_table(path))
    mappings = {id(a.base.obj): weakref.ref(a.base.obj) for a in held}  # array -> memoryview -> mmap
    assert held and all(type(m()).__name__ == "mmap" and not m().closed for m in mappings.values())
    held.clear()
    gc.collect()
    assert all(m() is None for m in mappings.values())  # unmapped with its last view


def _value_pages(path: str) -> list[tuple[int, int, int]]:
    """(row group, page, first data byte) of every page of the ``value`` chunks."""
    data = open(path, "rb").read()
    md = pq.ParquetFile(path).metadata
    found = []
    for rg in range(md.num_row_groups):
        lo, hi = page_checks.chunk_range(md.row_group(rg).column(2))
        found += [(rg, page, start) for page, (start, _, _) in enumerate(_pages_by_decoder(data, lo, hi))]
    return found


@pytest.mark.parametrize("writer", ["snappy v1", "uncompressed", "small pages"])
def test_a_flipped_bit_in_any_page_is_caught_as_pyarrow_catches_it(tmp_path, writer):
    good = _write(tmp_path / "good.parquet", **WRITERS[writer])
    data = open(good, "rb").read()
    pages = _value_pages(good)
    for rg, page, start in pages[:: max(1, len(pages) // 6)]:
        bad = tmp_path / f"bad-{rg}-{page}.parquet"
        flipped = bytearray(data)
        flipped[start + 3] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(OSError, match="CRC checksum verification failed"):  # pyarrow's verdict
            pq.ParquetFile(bad, page_checksum_verification=True).read()
        checked = page_checks.open_checked(str(bad))
        assert checked.read_row_group(0 if rg else 1, columns=["value"]).num_rows  # another row group: fine
        with pytest.raises(DataError) as caught:
            checked.read_row_group(rg, columns=["path", "Date", "value"])
        assert str(caught.value) == (f"{bad}: CRC checksum verification failed for column 'value', row group"
                                     f" {rg}, page {page}: the file is corrupt")


@pytest.mark.parametrize("strategy", ["dense", "aligned", "sum"])
def test_a_leaf_fails_on_a_corrupt_page_naming_it(tmp_path, strategy):
    """Every strategy's local reads check pages here: a flipped value bit (keys untouched, so the
    aligned leaf takes the file as aligned and reads its values) is a DataError naming file and page."""
    good = _write(tmp_path / "good.parquet")
    data = bytearray(open(good, "rb").read())
    rg, page, start = _value_pages(good)[-1]
    data[start + 8] ^= 0x01
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    leaf = {"dense": lambda: dense.dense_leaf([good, str(bad)], good),
            "aligned": lambda: kernels.aligned_leaf([good, str(bad)], good),
            "sum": lambda: kernels.sum_leaf([good, str(bad)])}[strategy]
    with pytest.raises(DataError) as caught:
        leaf()
    assert str(caught.value) == (f"{bad}: CRC checksum verification failed for column 'value', row group"
                                 f" {rg}, page {page}: the file is corrupt")


def test_the_aligned_final_checks_the_reference_keys_pages(tmp_path):
    """The aligned final decodes the reference's keys for the output: a corrupt key page there is caught."""
    reference = _write(tmp_path / "ref.parquet", table=_sorted_table())
    partial = kernels.aligned_leaf([reference], reference)
    data = bytearray(open(reference, "rb").read())
    md = pq.ParquetFile(reference).metadata
    lo, hi = page_checks.chunk_range(md.row_group(0).column(0))
    first_page = _pages_by_decoder(bytes(data), lo, hi)[-1]
    data[first_page[0] + first_page[1] - 2] ^= 0x01  # the last byte but one of the path chunk's last page
    open(reference, "wb").write(bytes(data))
    with pytest.raises(DataError, match=f"{reference}: CRC checksum verification failed for column 'path',"
                                        " row group 0, page "):
        kernels.aligned_final([partial], reference, str(tmp_path / "out.parquet"))
    assert not (tmp_path / "out.parquet").exists()


def test_without_checksums_only_the_headers_are_walked(tmp_path):
    path = str(tmp_path / "plain.parquet")
    pq.write_table(_table(), path, compression="none")  # no page CRCs (pyarrow's default)
    data = bytearray(open(path, "rb").read())
    md = pq.ParquetFile(path).metadata
    lo, hi = page_checks.chunk_range(md.row_group(0).column(2))
    assert {crc for _, _, crc in _pages_by_decoder(bytes(data), lo, hi)} == {NO_CRC}
    _, _, start = _value_pages(path)[0]
    data[start + 3] ^= 0x10  # a flipped value bit: undetectable without a CRC, by anyone
    (tmp_path / "flipped.parquet").write_bytes(bytes(data))
    checked = page_checks.open_checked(str(tmp_path / "flipped.parquet"))
    read = checked.read()
    expected = pq.ParquetFile(tmp_path / "flipped.parquet", page_checksum_verification=True).read()
    assert read.equals(expected) and not read.equals(pq.read_table(path))


def test_a_header_the_walk_cannot_read_is_left_to_pyarrow(tmp_path):
    good = _write(tmp_path / "good.parquet")
    data = bytearray(open(good, "rb").read())
    md = pq.ParquetFile(good).metadata
    lo, _ = page_checks.chunk_range(md.row_group(0).column(2))
    data[lo] = 0x0F  # the first header's first field: an unknown Thrift type
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    checked = page_checks.open_checked(str(bad))
    assert checked.read_row_group(0, columns=["path"]).num_rows == md.row_group(0).num_rows
    with pytest.raises(OSError):  # pyarrow's own error for the header, not a wrong value
        checked.read_row_group(0, columns=["value"])
    assert checked._pyarrow_verifies and checked._fd is None


def test_the_walk_refuses_cut_headers_and_asks_for_room():
    data = tc.encode_struct([[1, tc.I32, 0], [2, tc.I32, 10], [3, tc.I32, 4], [4, tc.I32, -5]])
    page = np.frombuffer(data + b"abcd", np.uint8)
    out = np.empty((4, 3), np.int64)
    assert page_checks.page_spans(page, 0, len(page), out) == 1
    assert tuple(out[0]) == (len(data), 4, (-5) & 0xFFFFFFFF)
    assert page_checks.page_spans(page, 0, len(page) - 1, out) == UNREADABLE  # the page runs past the chunk
    assert page_checks.page_spans(page, 0, 3, out) == UNREADABLE  # the header is cut
    assert page_checks.page_spans(np.frombuffer((data + b"abcd") * 2, np.uint8), 0, 2 * len(page),
                                  np.empty((1, 3), np.int64)) == OUT_FULL


def test_skipping_every_thrift_type_lands_where_the_decoder_does():
    nested = EVERY_TYPE + [[41, tc.LIST, (tc.STRUCT, [EVERY_TYPE, [[1, tc.I32, 3]]])],
                           [42, tc.MAP, (tc.I32 << 4 | tc.LIST, [(1, (tc.TRUE, [True])), (2, (tc.I16, [1, 2]))])]]
    encoded = tc.encode_struct(nested)
    buf = np.frombuffer(encoded + b"\x00tail", np.uint8)
    assert page_checks._skip(buf, 0, len(buf), tc.STRUCT) == len(encoded)
    assert page_checks._skip(buf, 0, len(encoded) - 1, tc.STRUCT) == -1  # cut short


def test_too_deep_a_nesting_is_unreadable():
    inner = [[1, tc.I32, 1]]
    for _ in range(page_checks.MAX_DEPTH + 1):
        inner = [[1, tc.STRUCT, inner]]
    encoded = tc.encode_struct(inner)
    assert page_checks._skip(np.frombuffer(encoded, np.uint8), 0, len(encoded), tc.STRUCT) == -1


@pytest.mark.parametrize("fast_crc", [True, False])
def test_without_isal_pyarrow_verifies(tmp_path, monkeypatch, fast_crc):
    path = _write(tmp_path / "f.parquet")
    monkeypatch.setattr(page_checks, "FAST_CRC", fast_crc)
    expected = CheckedParquetFile if fast_crc else pq.ParquetFile
    assert type(page_checks.open_checked(path)) is expected
    with pytest.raises(DataError, match="file not found"):
        page_checks.open_checked(str(tmp_path / "missing.parquet"))
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        page_checks.open_checked(str(tmp_path / "text.parquet"))


def test_aligned_and_sum_load_numba_only_where_a_worker_has_it(tmp_path):
    """``load_numba=False`` (the aligned and sum tasks) opens with pyarrow's verification in a process
    without numba, and never imports it; once page_checks is loaded (a dense task), it checks here."""
    import subprocess
    import sys

    path = _write(tmp_path / "f.parquet")
    script = f"""
import sys
from throttler.worker import contract, kernels
plain = contract.open_checked({path!r}, load_numba=False)
print(type(plain).__name__, "numba" in sys.modules)
from throttler.worker import page_checks
print(type(contract.open_checked({path!r}, load_numba=False)).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["ParquetFile", "False", "CheckedParquetFile"]


@pytest.mark.parametrize("limit_bytes, loaded", [(None, False), (600_000_000, False),
                                                 (NUMBA_PRELOAD_MIN_LIMIT_BYTES - 1, False),
                                                 (NUMBA_PRELOAD_MIN_LIMIT_BYTES, True), (32 * 2**30, True)])
def test_the_worker_probe_loads_numba_only_on_workers_large_enough(limit_bytes, loaded):
    """The daemon's package probe imports kernels everywhere, and page_checks (numba: up to 144 MiB)
    only where that is at most the 5% solo margin of the worker's limit; a 600 MB worker is left without."""
    import subprocess
    import sys

    script = f"""
import sys, types
from throttler.cluster.workers import worker_package_probe
worker = None if {limit_bytes!r} is None else types.SimpleNamespace(
    memory_manager=types.SimpleNamespace(memory_limit={limit_bytes!r}))
report = worker_package_probe()(worker)
print(report["error"], "throttler.worker.kernels" in sys.modules, "throttler.worker.page_checks" in sys.modules,
      "numba" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "True", str(loaded), str(loaded)]


def test_a_worker_that_compiled_the_loops_reports_more_code_than_one_that_loaded_them(tmp_path):
    """numba's cache in a fresh directory: the first process compiles (144 MiB reported), the next loads
    what it wrote (112 MiB); a process without numba reports nothing."""
    import os
    import subprocess
    import sys

    from throttler.cluster.snapshot import NUMBA_COMPILED_BYTES, NUMBA_RESIDENT_BYTES

    script = """
import sys
from throttler.cluster.snapshot import resident_code_bytes, numba_compiled_here
before = resident_code_bytes()
import throttler.worker.scatter
print(before, resident_code_bytes(), numba_compiled_here())
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}

    def run() -> list[str]:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env=env).stdout.split()

    assert run() == ["0", str(NUMBA_COMPILED_BYTES), "True"]
    assert run() == ["0", str(NUMBA_RESIDENT_BYTES), "False"]


def test_a_page_checks_still_being_imported_is_not_used(tmp_path, monkeypatch):
    """A worker thread that finds page_checks half imported (a dense task importing it meanwhile) uses pyarrow."""
    import sys
    import types

    from throttler.worker import contract

    path = _write(tmp_path / "f.parquet")
    monkeypatch.setitem(sys.modules, "throttler.worker.page_checks", types.ModuleType("throttler.worker.page_checks"))
    assert type(contract.open_checked(path, load_numba=False)) is pq.ParquetFile

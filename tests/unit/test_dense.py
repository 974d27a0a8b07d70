"""The dense strategy: kernels on real Parquet files, its domain, the planner's choice for sparse keys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.datafiles import assert_matches_reference, plan_for, read_output, write_sim
from throttler.errors import DataError
from throttler.planning.footers import file_info
from throttler.planning.plan import FileInfo
from throttler.planning.planner import dense_suits, fallback_strategy, resolve_strategy
from throttler.worker import dense, dense_merge, graphs, pages


def run_dense(paths, out, files_per_task=2, fan_in=2) -> dict:
    return graphs.build(plan_for("g", paths, "dense", files_per_task, fan_in), str(out)).final.compute(
        scheduler="sync")


def test_domain_reads_dictionary_pages_and_footer_statistics(tmp_path):
    a = write_sim(tmp_path / "a.parquet", n_paths=30, n_dates=6, row_group_size=50)
    b = write_sim(tmp_path / "b.parquet", n_paths=40, n_dates=6, drop_paths=range(10), shuffle=True,
                  date_type=pa.timestamp("us"))
    grid = dense.domain([a, b])
    want = np.unique(pq.read_table(a).column("Date").cast(pa.timestamp("ns")).to_numpy().view(np.int64))
    assert (grid.path_min, grid.path_max, grid.cells, grid.date_type) == (0, 39, 40 * 6, pa.date32())
    np.testing.assert_array_equal(grid.dates_ns, want)
    md = pq.ParquetFile(a).metadata
    with pa.memory_map(a) as source:
        assert [len(pages.dictionary_values(md.row_group(i).column(1), source)) for i in range(4)] == [6, 6, 6, 6]


class _CountingSource:
    """A real file's ``read_at``, counting the reads (each one is a request on an object store)."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def read_at(self, nbytes, offset):
        self.reads += 1
        return self.source.read_at(nbytes, offset)


def test_a_dictionary_page_is_read_in_one_request_whatever_the_number_of_data_pages(tmp_path):
    path = str(tmp_path / "pages.parquet")
    table = pq.read_table(write_sim(tmp_path / "src.parquet", n_paths=3000, n_dates=6, shuffle=True))
    pq.write_table(table, path, data_page_size=1024)  # many small data pages in the chunk
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    with pa.memory_map(path) as mapped:
        counted = _CountingSource(mapped)
        values = pages.dictionary_values(col, counted)
    assert counted.reads == 1
    want = np.unique(table.column("Date").cast(pa.int32()).to_numpy())
    np.testing.assert_array_equal(np.sort(values), want)


def _fallen_back_dates_file(tmp_path) -> str:
    """A shuffled file whose Date chunk outgrew its dictionary: later pages are plain, with dates the
    dictionary page does not list."""
    path = str(tmp_path / "fallback.parquet")
    table = pq.read_table(write_sim(tmp_path / "src.parquet", n_paths=200, n_dates=60, shuffle=True))
    table = table.sort_by("Date")  # the dates the dictionary holds come first, the others after it is full
    pq.write_table(table, path, dictionary_pagesize_limit=64, data_page_size=256)
    return path


def test_dates_a_writer_wrote_past_its_dictionary_restart_the_leaf_on_decoded_dates(tmp_path):
    path = _fallen_back_dates_file(tmp_path)
    assert dense.domain([path]).n_dates < 60  # what the dictionary page lists: not every date
    assert dense.domain([path], decoded=True).n_dates == 60
    other = write_sim(tmp_path / "b.parquet", n_paths=200, n_dates=60, seed=1, shuffle=True)
    run_dense([path, other], tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", [path, other])


def test_domain_without_statistics_or_dictionary_reads_the_data(tmp_path):
    path = str(tmp_path / "plain.parquet")
    table = pq.read_table(write_sim(tmp_path / "src.parquet", n_paths=12, n_dates=4, shuffle=True))
    pq.write_table(table, path, write_statistics=False, use_dictionary=False)
    grid = dense.domain([path])
    assert (grid.path_min, grid.path_max, grid.n_dates) == (0, 11, 4)
    assert file_info(path).path_min is None and file_info(path).date_count == 0
    run_dense([path], tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", [path])


def test_mixed_group_through_leaves_combines_and_final(tmp_path):
    paths = [write_sim(tmp_path / "a.parquet", seed=1), write_sim(tmp_path / "b.parquet", seed=2),
             write_sim(tmp_path / "c.parquet", seed=3, shuffle=True, drop_paths=(3, 4), path_type=pa.int32(),
                       date_type=pa.timestamp("ms")),
             write_sim(tmp_path / "d.parquet", seed=4, n_paths=60, nan_frac=0.1, row_group_size=70),
             write_sim(tmp_path / "e.parquet", seed=5)]
    summary = run_dense(paths, tmp_path / "out.parquet", files_per_task=1, fan_in=2)
    assert_matches_reference(tmp_path / "out.parquet", paths)
    nans = int(np.isnan(pq.read_table(paths[3]).column("value").to_numpy()).sum())
    assert (summary["strategy"], summary["rows"], summary["files"], summary["nan_count"]) == ("dense", 360, 5, nans)
    assert pq.read_schema(tmp_path / "out.parquet").field("Date").type == pa.date32()


def test_opposite_infinities_give_nan_and_keys_absent_everywhere_are_not_output(tmp_path):
    table = pa.table({"path": pa.array([0, 5], pa.int64()), "Date": pa.array([1, 1], pa.date32()),
                      "value": [np.inf, 1.0]})
    other = pa.table({"path": pa.array([5, 0], pa.int16()), "Date": pa.array([1, 1], pa.date32()),
                      "value": [np.nan, -np.inf]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(other, tmp_path / "b.parquet")
    run_dense([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], tmp_path / "out.parquet")
    got = read_output(tmp_path / "out.parquet")
    assert got["path"].tolist() == [0, 5]  # paths 1..4 lie in the grid, in no file
    assert np.isnan(got["value"][0]) and got["value"][1] == 1.0


def test_duplicated_key_in_one_file_is_a_data_error_naming_it(tmp_path):
    good = write_sim(tmp_path / "good.parquet", n_paths=5, n_dates=3)
    table = pq.read_table(good)
    bad = str(tmp_path / "dup.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(4, 1)]).take(pa.array(np.arange(16)[::-1])), bad)
    with pytest.raises(DataError, match=r"dup\.parquet: duplicated key \(path=1"):
        run_dense([good, bad], tmp_path / "out.parquet")
    with pytest.raises(DataError, match=r"dup\.parquet: duplicated key"):
        run_dense([bad], tmp_path / "out2.parquet")  # the reference itself: its aligned add path
    spread = str(tmp_path / "spread.parquet")  # the repeat in another row group than the first
    pq.write_table(pa.concat_tables([table, table.slice(4, 1)]), spread, row_group_size=5)
    assert pq.ParquetFile(spread).metadata.num_row_groups == 4
    with pytest.raises(DataError, match=r"spread\.parquet: duplicated key \(path=1"):
        run_dense([good, spread], tmp_path / "out3.parquet")


def test_grid_too_large_is_misaligned_keys_so_auto_falls_back(tmp_path):
    table = pa.table({"path": pa.array([0, 2**40]), "Date": pa.array([1, 1], pa.date32()), "value": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "sparse.parquet")
    with pytest.raises(dense.GridTooLarge, match="too sparse"):
        dense.domain([str(tmp_path / "sparse.parquet")])
    info = file_info(str(tmp_path / "sparse.parquet"))
    assert (info.path_min, info.path_max, info.date_count) == (0, 2**40, 1)
    assert dense_suits([info]) == (False, "sparse keys: a grid of 1,099,511,627,777 cells exceeds 134,217,728")


def info(path_min, path_max, dates=120, rows=6_000_000) -> FileInfo:
    return FileInfo("/d/f.parquet", 50_000_000, rows=rows, decoded_bytes=55_000_000, path_min=path_min,
                    path_max=path_max, date_count=dates)


def test_planner_picks_sum_for_sparse_keys_and_dense_for_dense_ones():
    shuffled = [info(0, 49_999, rows=5_700_000), info(0, 52_499, rows=6_300_000)]
    note = "auto -> dense: 6,300,000 grid cells for 12,000,000 rows"
    assert resolve_strategy("auto", shuffled) == ("dense", [note])
    eight_per_row = 8 * 12_000_000 // 120
    assert dense_suits([info(0, eight_per_row - 1, rows=6_000_000)] * 2)[0] is True
    assert dense_suits([info(0, eight_per_row, rows=6_000_000)] * 2)[0] is False
    spread = [info(0, 2**62, rows=6_000_000), info(5, 2**62, rows=5_000_000)]  # 64-bit ids, a huge range
    assert resolve_strategy("auto", spread)[0] == "sum"
    assert resolve_strategy("auto", [FileInfo("/d/f.parquet", 1, rows=5), FileInfo("/d/g.parquet", 1, rows=6)]
                            )[0] == "sum"  # no statistics: no grid estimate
    assert resolve_strategy("dense", spread) == ("dense", [])
    assert fallback_strategy("aligned", shuffled) == "dense"
    assert fallback_strategy("aligned", spread) == "sum"
    assert fallback_strategy("dense", shuffled) == "sum"


def test_footers_tell_a_shuffled_file_from_a_reencoded_one_and_auto_takes_dense(tmp_path):
    """Equal row counts, row groups with other path ranges: ``auto`` goes to dense without an aligned
    attempt, and ``dense`` leaves share out the files that must scatter. The same keys re-encoded
    (another codec, ``path`` not dictionary-encoded) keep ``aligned``."""
    sorted_file = write_sim(tmp_path / "a.parquet", n_paths=300, n_dates=12, row_group_size=1000)
    recoded = str(tmp_path / "recoded.parquet")
    pq.write_table(pq.read_table(sorted_file), recoded, row_group_size=1000, compression="zstd",
                   use_dictionary=["Date"])
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=300, n_dates=12, seed=3, shuffle=True, row_group_size=1000)
    a, r, s = (file_info(p) for p in (sorted_file, recoded, shuffled))
    assert a.rows == r.rows == s.rows == 3600
    assert a.row_group_paths == r.row_group_paths == ((1000, 0, 83), (1000, 83, 166), (1000, 166, 249), (600, 250, 299))
    assert [g[1:] for g in s.row_group_paths] == [(0, 299)] * 4
    assert (a.may_share_keys(r), a.may_share_keys(s)) == (True, False)
    assert resolve_strategy("auto", [a, r])[0] == "aligned"
    assert resolve_strategy("auto", [a, r, s]) == ("dense", ["auto -> dense: 3,600 grid cells for 10,800 rows"])
    files = [a, r, r, r, s, s]
    plan = dataclasses.replace(plan_for("g", [f.path for f in files], "dense", files_per_task=3), files=tuple(files))
    chunks = graphs.dense_chunks(plan, [3, 3])
    assert [chunk.count(str(shuffled)) for chunk in chunks] == [1, 1]


def _copy(source: str, target) -> str:
    target.write_bytes(open(source, "rb").read())
    return str(target)


def test_a_leaf_whose_files_all_match_the_reference_makes_no_grid(tmp_path):
    ref = write_sim(tmp_path / "ref.parquet", n_paths=40, n_dates=5, nan_frac=0.1)
    paths = [ref, _copy(ref, tmp_path / "b.parquet"), _copy(ref, tmp_path / "c.parquet")]
    leaf = dense.dense_leaf(paths, ref)
    assert isinstance(leaf.data, dense.ReferenceRows) and len(leaf.data.values) == 200
    summary = run_dense(paths, tmp_path / "out.parquet", files_per_task=2)  # 2 leaves of reference rows
    assert_matches_reference(tmp_path / "out.parquet", paths)
    nans = int(np.isnan(pq.read_table(ref).column("value").to_numpy()).sum())
    assert (summary["strategy"], summary["rows"], summary["files"], summary["nan_count"]) == (
        "dense", 200, 3, 3 * nans)


def test_reference_rows_meet_a_narrower_grid_in_the_merge(tmp_path):
    """Reference rows merged with the grid of a leaf whose shuffled file lacks paths and dates the
    reference has: the merge's grid must hold the reference's keys too."""
    ref = write_sim(tmp_path / "ref.parquet", n_paths=40, n_dates=6)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=30, n_dates=4, seed=2, shuffle=True, drop_paths=(0, 1))
    paths = [ref, _copy(ref, tmp_path / "b.parquet"), shuffled]
    rows, grid = dense.dense_leaf(paths[:2], ref), dense.dense_leaf(paths[2:], ref)
    assert isinstance(rows.data, dense.ReferenceRows)
    assert (grid.data.grid.path_min, grid.data.grid.cells) == (2, 28 * 4)
    for partials in ([rows, grid], [grid, rows]):
        dense_merge.dense_final(partials, ref, str(tmp_path / "out.parquet"))
        assert_matches_reference(tmp_path / "out.parquet", paths)


def test_reference_rows_of_a_reference_whose_dictionary_misses_dates_merge_on_decoded_dates(tmp_path):
    """The reference wrote dates past its dictionary; the other leaf's grid has only the listed ones:
    the merge's grid from the reference's dictionary pages misses dates, and is made again decoded."""
    ref = _fallen_back_dates_file(tmp_path)
    listed = dense.domain([ref]).dates_ns
    table = pq.read_table(ref)
    listed_rows = np.isin(table.column("Date").cast(pa.timestamp("ns")).to_numpy().view(np.int64), listed)
    shuffled = str(tmp_path / "s.parquet")
    subset = table.filter(pa.array(listed_rows))
    pq.write_table(subset.take(np.random.default_rng(5).permutation(subset.num_rows)), shuffled)
    paths = [ref, _copy(ref, tmp_path / "b.parquet"), shuffled]
    rows, grid = dense.dense_leaf(paths[:2], ref), dense.dense_leaf(paths[2:], ref)
    assert isinstance(rows.data, dense.ReferenceRows) and grid.data.grid.n_dates == len(listed) < 60
    dense_merge.dense_final([rows, grid], ref, str(tmp_path / "out.parquet"))
    assert_matches_reference(tmp_path / "out.parquet", paths)


def test_a_duplicated_key_in_a_reference_no_file_scattered_against_is_still_an_error(tmp_path):
    table = pq.read_table(write_sim(tmp_path / "src.parquet", n_paths=5, n_dates=3))
    ref = str(tmp_path / "dup.parquet")
    pq.write_table(pa.concat_tables([table.slice(0, 5), table.slice(4, 11)]), ref)  # row 4 twice, in order
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=5, n_dates=3, seed=1, shuffle=True)
    with pytest.raises(DataError, match=r"dup\.parquet: duplicated"):
        run_dense([ref, _copy(ref, tmp_path / "b.parquet")], tmp_path / "out.parquet", files_per_task=1)
    with pytest.raises(DataError, match=r"dup\.parquet: duplicated"):
        run_dense([ref, _copy(ref, tmp_path / "c.parquet"), shuffled], tmp_path / "out2.parquet",
                  files_per_task=2)


def test_the_reference_is_scattered_unless_another_file_of_its_leaf_has_its_key_bytes(tmp_path, monkeypatch):
    ref = write_sim(tmp_path / "ref.parquet", n_paths=30, n_dates=4, shuffle=True)
    other = write_sim(tmp_path / "o.parquet", n_paths=30, n_dates=4, seed=2, shuffle=True)
    copy = _copy(ref, tmp_path / "copy.parquet")
    added_by_rows = []
    real = dense._Accumulator._add_aligned
    monkeypatch.setattr(dense._Accumulator, "_add_aligned",
                        lambda self, pf, path, part: (added_by_rows.append(path), real(self, pf, path, part)))
    alone = dense.dense_leaf([ref, other], ref)
    assert added_by_rows == [] and isinstance(alone.data, dense.Cells)
    with_copy = dense.dense_leaf([ref, copy, other], ref)
    assert added_by_rows == [copy, ref]  # the reference last, by rows since its copy was
    for leaf, paths in ((alone, [ref, other]), (with_copy, [ref, copy, other])):
        dense_merge.dense_final([leaf], ref, str(tmp_path / "out.parquet"))
        assert_matches_reference(tmp_path / "out.parquet", paths)


@pytest.mark.parametrize("cells", [
    np.arange(7, 7 + 1000, dtype=np.int64),  # a sorted, complete reference: one block
    np.random.default_rng(3).permutation(2000)[:1000].astype(np.int64),  # shuffled
    np.r_[np.arange(100, 600), np.arange(601, 1101)].astype(np.int64),  # a run with one gap at row 500
])
def test_reference_rows_add_into_the_grid_as_numpy_add_at_does_whatever_their_order(cells):
    from throttler.worker import scatter

    rng = np.random.default_rng(4)
    values = rng.random(len(cells))
    values[::97] = np.nan  # sums may hold NaN (an inf + -inf): added as they are
    sums, marks = rng.random(2200), dense.new_marks(2200)
    expected_sums, expected_present = sums.copy(), np.zeros(2200, bool)
    np.add.at(expected_sums, cells, values)
    expected_present[cells] = True
    scatter.add_at_marking(cells, values, sums, marks)
    np.testing.assert_array_equal(sums, expected_sums)
    np.testing.assert_array_equal(dense.presence(marks, 2200), expected_present)
    assert dense.marked_count(marks) == len(cells)


def test_the_scatter_add_marks_each_cell_of_a_file_once_and_skips_nan_as_numpy_nansum_would():
    from throttler.worker import scatter

    rng = np.random.default_rng(11)
    n_cells = 2203  # not a multiple of 8: the bitmap's last byte is partial
    cells = rng.permutation(n_cells)[:1500].astype(np.int64)
    values = rng.random(len(cells))
    values[::41] = np.nan
    sums, marks = rng.random(n_cells), dense.new_marks(n_cells)
    expected = sums.copy()
    np.add.at(expected, cells, np.where(np.isnan(values), 0.0, values))
    nans, duplicate = scatter.scatter_add_marking(cells, values, sums, marks)
    assert (nans, duplicate) == (int(np.isnan(values).sum()), scatter.NO_DUPLICATE)
    np.testing.assert_array_equal(sums, expected)
    present = np.zeros(n_cells, bool)
    present[cells] = True
    np.testing.assert_array_equal(dense.presence(marks, n_cells), present)
    assert dense.marked_count(marks) == len(cells)


def test_the_scatter_add_stops_at_a_files_first_repeated_cell():
    from throttler.worker import scatter

    cells = np.array([5, 9, 2203 - 1, 9, 5], np.int64)  # row 3 repeats row 1's cell
    sums, marks = np.zeros(2203), dense.new_marks(2203)
    nans, duplicate = scatter.scatter_add_marking(cells, np.ones(5), sums, marks)
    assert (nans, duplicate) == (0, 3)
    assert sums[[5, 9, 2202]].tolist() == [1.0, 1.0, 1.0]  # the rows before the repeat were added


def _random_cells(rng, path_min: int, path_max: int, dates_ns: np.ndarray, present_share: float) -> dense.Cells:
    grid = dense.Grid(path_min, path_max, dates_ns, pa.date32())
    values = rng.normal(size=grid.cells)
    values[rng.random(grid.cells) < 0.02] = np.inf
    values[rng.random(grid.cells) < 0.02] = -np.inf  # some cells sum inf + -inf: NaN in the output
    present = rng.random(grid.cells) < present_share
    values[~present] = 0.0  # as a leaf leaves them: nothing added
    return dense.Cells(grid, values, present)


@pytest.mark.parametrize("block_cells", [7, 30, 1 << 20])  # a block of less than one path, a few paths, all
def test_the_final_adds_grids_block_by_block_exactly_as_their_whole_sum(tmp_path, monkeypatch, block_cells):
    from throttler.worker.kernels import Partial

    rng = np.random.default_rng(21)
    day = 86_400 * 10**9
    all_dates = np.arange(12, dtype=np.int64) * day
    grids = [_random_cells(rng, 0, 20, all_dates, 1.0),  # every cell present
             _random_cells(rng, 15, 40, all_dates[::2], 0.5),  # wider paths, fewer dates
             _random_cells(rng, 38, 38, all_dates[3:4], 1.0)]  # one path, one date
    monkeypatch.setattr(dense_merge, "OUTPUT_BLOCK_CELLS", block_cells)
    partials = [Partial(dataclasses.replace(c)) for c in grids]
    for p in partials:
        p.date_type = pa.date32()
    streamed = dense_merge.dense_final(partials, "unused", str(tmp_path / "streamed.parquet"))
    whole = dense_merge.dense_final([dense_merge.dense_combine(partials)], "unused", str(tmp_path / "whole.parquet"))

    expected = {}
    for c in grids:
        for i in np.flatnonzero(c.present):
            key = (c.grid.path_min + i // c.grid.n_dates, int(c.grid.dates_ns[i % c.grid.n_dates]))
            expected[key] = expected.get(key, 0.0) + c.values[i]
    table = pq.read_table(tmp_path / "streamed.parquet")
    assert table.equals(pq.read_table(tmp_path / "whole.parquet"))
    assert streamed["rows"] == whole["rows"] == len(expected) == table.num_rows
    keys = list(zip(table.column("path").to_pylist(),
                    table.column("Date").cast(pa.timestamp("ns")).cast(pa.int64()).to_pylist()))
    assert keys == sorted(expected)
    np.testing.assert_array_equal(table.column("value").to_numpy(), np.array([expected[k] for k in keys]))

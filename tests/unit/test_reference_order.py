"""A reference whose rows are its grid's cells in order: one array for a mixed leaf, the answer remembered."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.datafiles import assert_matches_reference, write_sim
from throttler.errors import DataError
from throttler.worker import dense, dense_merge, reference_order, scatter


@pytest.fixture(autouse=True)
def _nothing_remembered():
    reference_order.forget()
    yield
    reference_order.forget()


def _copy(source: str, target) -> str:
    target.write_bytes(open(source, "rb").read())
    return str(target)


def _counting_reference_decodes(monkeypatch) -> list[str]:
    decoded, real = [], dense.reference_cells
    monkeypatch.setattr(dense, "reference_cells",
                        lambda path, coders: (decoded.append(path), (yield from real(path, coders)))[1])
    return decoded


@pytest.mark.parametrize("cells, start, expected", [
    (np.arange(5, 105, dtype=np.int64), 5, True),
    (np.arange(5, 105, dtype=np.int64), 4, False),
    (np.r_[np.arange(0, 50), np.arange(51, 101)].astype(np.int64), 0, False),  # a cell skipped
    (np.r_[0, 2, 1, np.arange(3, 40)].astype(np.int64), 0, False),  # two rows swapped
    (np.empty(0, np.int64), 7, True),
])
def test_runs_from_is_true_only_for_consecutive_cells(cells, start, expected):
    assert scatter.runs_from(cells, start) is expected


def test_a_mixed_leaf_over_a_sorted_full_reference_keeps_one_array_and_every_cell(tmp_path, monkeypatch):
    decoded = _counting_reference_decodes(monkeypatch)
    ref = write_sim(tmp_path / "ref.parquet", n_paths=40, n_dates=5, nan_frac=0.05, row_group_size=64)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=40, n_dates=5, seed=3, shuffle=True, nan_frac=0.05)
    paths = [shuffled, _copy(ref, tmp_path / "b.parquet"), ref]
    leaf = dense.dense_leaf(paths, ref)
    assert isinstance(leaf.data, dense.Cells) and decoded == [ref]
    assert (leaf.data.grid.cells, int(leaf.data.present.sum())) == (200, 200)
    assert reference_order.known_count() == 1
    dense_merge.dense_final([leaf], ref, str(tmp_path / "out.parquet"))
    assert_matches_reference(tmp_path / "out.parquet", paths)
    nans = sum(int(np.isnan(pq.read_table(p).column("value").to_numpy()).sum()) for p in paths)
    assert leaf.nan_count == nans


def test_a_reference_with_the_same_key_bytes_is_not_decoded_again(tmp_path, monkeypatch):
    decoded = _counting_reference_decodes(monkeypatch)
    first = write_sim(tmp_path / "r1.parquet", n_paths=30, n_dates=4, seed=1)
    second = write_sim(tmp_path / "r2.parquet", n_paths=30, n_dates=4, seed=2)  # same keys, other values
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=30, n_dates=4, seed=3, shuffle=True)
    for ref in (first, second):
        paths = [shuffled, _copy(ref, tmp_path / f"copy-{ref[-10:]}"), ref]
        dense_merge.dense_final([dense.dense_leaf(paths, ref)], ref, str(tmp_path / "out.parquet"))
        assert_matches_reference(tmp_path / "out.parquet", paths)
    assert decoded == [first] and reference_order.known_count() == 1


@pytest.mark.parametrize("ref_drops, shuffled_paths, first, present_cells", [
    ((), 33, 0, 32 * 4),  # the shuffled file reaches past the reference's paths (0..32 but 31)
    ((0, 1, 2), 30, 3 * 4, 30 * 4),  # the reference starts at path 3
])
def test_a_reference_that_is_a_run_of_a_wider_grid_is_a_slice_of_it(tmp_path, monkeypatch, ref_drops,
                                                                      shuffled_paths, first, present_cells):
    decoded = _counting_reference_decodes(monkeypatch)
    ref = write_sim(tmp_path / "ref.parquet", n_paths=30, n_dates=4, drop_paths=ref_drops)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=shuffled_paths, n_dates=4, seed=3, shuffle=True,
                         drop_paths=(31,))
    paths = [shuffled, _copy(ref, tmp_path / "b.parquet"), ref]
    leaf = dense.dense_leaf(paths, ref)
    present = leaf.data.present
    ref_cells = (30 - len(ref_drops)) * 4
    assert decoded == [ref] and reference_order.known_count() == 1
    assert present[first:first + ref_cells].all() and int(present.sum()) == present_cells
    dense_merge.dense_final([leaf], ref, str(tmp_path / "out.parquet"))
    assert_matches_reference(tmp_path / "out.parquet", paths)


@pytest.mark.parametrize("case", ["rows swapped", "a path missing", "a date missing for one path"])
def test_a_reference_not_in_grid_order_is_scattered_as_before(tmp_path, case):
    table = pq.read_table(write_sim(tmp_path / "src.parquet", n_paths=30, n_dates=4, seed=1))
    ref = str(tmp_path / "ref.parquet")
    if case == "rows swapped":
        order = np.arange(table.num_rows)
        order[[10, 11]] = order[[11, 10]]
        pq.write_table(table.take(pa.array(order)), ref)
    elif case == "a path missing":
        pq.write_table(table.filter(pa.array(table.column("path").to_numpy() != 7)), ref)
    else:
        pq.write_table(table.filter(pa.array(np.arange(table.num_rows) != 41)), ref)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=30, n_dates=4, seed=3, shuffle=True)
    paths = [shuffled, _copy(ref, tmp_path / "b.parquet"), ref]
    leaf = dense.dense_leaf(paths, ref)
    assert int(leaf.data.present.sum()) == 30 * 4 and reference_order.known_count() == 0
    dense_merge.dense_final([leaf], ref, str(tmp_path / "out.parquet"))
    assert_matches_reference(tmp_path / "out.parquet", paths)


def test_a_grid_made_after_the_matching_files_takes_their_array(tmp_path, monkeypatch):
    """Matching files first, then a shuffled one: their sums so far move into the grid, whose slice takes
    the rest."""
    ref = write_sim(tmp_path / "ref.parquet", n_paths=20, n_dates=3)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=20, n_dates=3, seed=4, shuffle=True)
    copy = _copy(ref, tmp_path / "b.parquet")
    made = []
    real = dense._Accumulator._make_grid
    monkeypatch.setattr(dense._Accumulator, "_make_grid",
                        lambda self: (real(self), made.append(self.reference_sums.base is self.values)))
    leaf = dense.dense_leaf([copy, shuffled, ref], ref)
    assert made == [True]
    dense_merge.dense_final([leaf], ref, str(tmp_path / "out.parquet"))
    assert_matches_reference(tmp_path / "out.parquet", [copy, shuffled, ref])


def test_a_duplicated_key_in_a_file_scattered_into_the_one_array_is_a_data_error(tmp_path):
    ref = write_sim(tmp_path / "ref.parquet", n_paths=10, n_dates=3)
    table = pq.read_table(ref)
    dup = str(tmp_path / "dup.parquet")
    rows = np.r_[np.random.default_rng(2).permutation(table.num_rows), 4]
    pq.write_table(table.take(pa.array(rows[rows != 5])), dup)  # key 4 twice, key 5 absent
    with pytest.raises(DataError, match=r"dup\.parquet: duplicated"):
        dense.dense_leaf([dup, _copy(ref, tmp_path / "b.parquet"), ref], ref)


def test_reference_rows_meeting_a_grid_in_the_merge_are_added_as_a_block(tmp_path, monkeypatch):
    decoded, real = [], dense.reference_cells
    monkeypatch.setattr(dense_merge, "reference_cells",
                        lambda path, coders: (decoded.append(path), (yield from real(path, coders)))[1])
    ref = write_sim(tmp_path / "ref.parquet", n_paths=30, n_dates=4, nan_frac=0.05)
    shuffled = write_sim(tmp_path / "s.parquet", n_paths=33, n_dates=4, seed=3, shuffle=True, drop_paths=(2,))
    paths = [ref, _copy(ref, tmp_path / "b.parquet"), shuffled]
    rows, grid = dense.dense_leaf(paths[:2], ref), dense.dense_leaf(paths[2:], ref)
    assert isinstance(rows.data, dense.ReferenceRows) and isinstance(grid.data, dense.Cells)
    for partials in ([rows, grid], [grid, rows]):
        summary = dense_merge.dense_final(partials, ref, str(tmp_path / "out.parquet"))
        assert_matches_reference(tmp_path / "out.parquet", paths)
        assert summary["rows"] == 33 * 4
    assert decoded == [ref] and reference_order.known_count() == 1

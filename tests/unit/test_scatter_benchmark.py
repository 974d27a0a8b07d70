"""``benchmarks/scatter.py``: every variant it times sums exactly as throttler's loop does.

The script refuses to time a variant whose sums differ from throttler's; these
tests run it small, and check the check.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import scatter as bench
from throttler.worker import dense


def test_every_variant_sums_like_throttler_and_the_table_lists_them(capsys):
    bench.main(["--cells", "20000", "--rows", "1000", "--groups", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    table_rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in table_rows] == list(bench.variants(20000, 1000))
    assert table_rows[0].endswith("| 1.00 |")  # throttler's own loop is the baseline


def test_row_groups_are_distinct_cells_of_the_grid():
    groups = bench.row_groups(5000, 1000, 5)
    cells = np.concatenate([c for c, _ in groups])
    assert len(cells) == 5000 and len(np.unique(cells)) == 5000
    assert cells.min() == 0 and cells.max() == 4999


def test_a_repeated_key_stops_a_pass_whether_the_loop_tests_its_marks_or_they_are_counted_after():
    cells = np.array([3, 7, 3], np.int64)
    marks = dense.new_marks(10)
    with pytest.raises(AssertionError, match="repeated a key"):
        bench.one_pass(bench.marking_loop(0), [(cells, np.ones(3))], np.zeros(10), marks)
    with pytest.raises(AssertionError, match="fewer cells marked than rows"):
        bench.one_pass(bench.marking_loop(0, test_marks=False), [(cells, np.ones(3))], np.zeros(10), marks)


def test_the_loop_without_marks_leaves_them_clear():
    marks = dense.new_marks(10)
    bench.marking_loop(0, marks_on=False)(np.array([3, 7, 3], np.int64), np.ones(3), np.zeros(10), marks)
    assert dense.marked_count(marks) == 0


def test_radix_pass_adds_in_range_order_to_the_same_sums():
    groups = bench.row_groups(4096, 1024, 4, seed=3)
    expected, got = np.zeros(4096), np.zeros(4096)
    marks = dense.new_marks(4096)
    bench.one_pass(bench.variants(4096, 1024)["np.add.at (no marks)"], groups, expected, marks)
    ordered = np.empty(1024, np.int64), np.empty(1024)
    bench.one_pass(lambda c, v, s, m: bench.radix_then_add(c, v, s, m, 6, *ordered), groups, got, marks)
    assert np.array_equal(got, expected)


def test_too_many_rows_for_the_grid_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--cells", "100", "--rows", "60", "--groups", "2"])

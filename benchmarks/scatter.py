"""The ``dense`` scatter-add on this machine: throttler's loop against the ways it was chosen over.

    python benchmarks/scatter.py                      # a 6.3M-cell grid, six row groups of 1,048,576 rows
    python benchmarks/scatter.py --cells 1000000 --repeats 9

A shuffled file's rows land anywhere in a grid far larger than the caches (48 MB
of float64 sums for 50,000 paths x 120 dates), so each row's add is a cache
miss. How much that costs, and whether asking for the line ahead
(``llvm.prefetch``) helps, depends on the machine: on some VMs prefetching
halves the loop, on others it changes nothing. This script measures it in one
process, on cells like a shuffled file's (a permutation of the grid's cells,
cut into row groups, so no row repeats a key), with the bitmap of marks cleared
before each "file" as the leaf does.

Variants: throttler's :func:`~throttler.worker.scatter.scatter_add_marking`
(prefetch :data:`~throttler.worker.scatter.PREFETCH_ROWS_AHEAD` rows ahead); the
same loop prefetching 0, 32 and 512 rows ahead; the loop setting each mark
without testing it, the file's marks counted after it instead (no load, test
and branch on the mark before each add); the loop without marks (what the
duplicate check and presence cost); a radix pass that orders each row group by
cell range first, so that each range's adds stay in L2; ``np.add.at``. Every
variant's sums are checked equal to throttler's before anything is timed.
"""

from __future__ import annotations

import argparse
import platform
import time

import numba
import numpy as np

from throttler.worker import dense, scatter
from throttler.worker.scatter import _prefetch_for_write


def marking_loop(rows_ahead: int, marks_on: bool = True, test_marks: bool = True):
    """throttler's scatter-add loop with another prefetch distance (0: none), without marks, or setting
    each mark with no test (``test_marks=False``: a repeated cell is then found after the file, when
    fewer cells are marked than it has rows)."""
    @numba.njit(nogil=True)
    def loop(cells, values, sums, marks):
        n = cells.shape[0]
        for i in range(n):
            if rows_ahead and i + rows_ahead < n:
                _prefetch_for_write(sums, cells[i + rows_ahead])
            c = cells[i]
            if marks_on and test_marks:
                byte, bit = c >> 3, np.uint8(1 << (c & 7))
                mark = marks[byte]
                if mark & bit:
                    return i
                marks[byte] = mark | bit
            elif marks_on:
                marks[c >> 3] |= np.uint8(1 << (c & 7))
            v = values[i]
            if not np.isnan(v):
                sums[c] += v
        return -1
    return loop


@numba.njit(nogil=True)
def radix_then_add(cells, values, sums, marks, shift, ordered_cells, ordered_values):
    """Order the row group by ``cell >> shift`` (a counting sort), then add and mark in that order."""
    n = cells.shape[0]
    n_ranges = (sums.shape[0] >> shift) + 1
    starts = np.zeros(n_ranges + 1, np.int64)
    for i in range(n):
        starts[(cells[i] >> shift) + 1] += 1
    for r in range(n_ranges):
        starts[r + 1] += starts[r]
    for i in range(n):
        r = cells[i] >> shift
        j = starts[r]
        ordered_cells[j], ordered_values[j] = cells[i], values[i]
        starts[r] = j + 1
    for j in range(n):
        c = ordered_cells[j]
        byte, bit = c >> 3, np.uint8(1 << (c & 7))
        if marks[byte] & bit:
            return j
        marks[byte] |= bit
        v = ordered_values[j]
        if not np.isnan(v):
            sums[c] += v
    return -1


def row_groups(n_cells: int, rows: int, groups: int, seed: int = 0):
    """(cells, values) of ``groups`` row groups: distinct cells of the grid in random order, 0.1% NaN."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cells)[:rows * groups].astype(np.int64)
    values = rng.standard_normal(rows * groups)
    values[rng.integers(0, len(values), len(values) // 1000)] = np.nan
    return [(order[g * rows:(g + 1) * rows], values[g * rows:(g + 1) * rows]) for g in range(groups)]


def variants(n_cells: int, rows: int) -> dict:
    ordered_cells, ordered_values = np.empty(rows, np.int64), np.empty(rows)
    shift = max(0, int(n_cells // 48).bit_length() - 1)  # about 48 ranges: each range's sums about 1 MB

    def np_add_at(cells, values, sums, marks):
        keep = ~np.isnan(values)
        np.add.at(sums, cells[keep], values[keep])
        return -1

    return {
        f"throttler (prefetch {scatter.PREFETCH_ROWS_AHEAD} rows ahead)":
            lambda c, v, s, m: scatter.scatter_add_marking(c, v, s, m)[1],
        "marks set untested, counted after": marking_loop(scatter.PREFETCH_ROWS_AHEAD, test_marks=False),
        "no prefetch": marking_loop(0),
        "prefetch 32 rows ahead": marking_loop(32),
        "prefetch 512 rows ahead": marking_loop(512),
        f"no marks (prefetch {scatter.PREFETCH_ROWS_AHEAD})": marking_loop(scatter.PREFETCH_ROWS_AHEAD, False),
        f"radix by cell >> {shift}, then add": lambda c, v, s, m: radix_then_add(
            c, v, s, m, shift, ordered_cells, ordered_values),
        "np.add.at (no marks)": np_add_at,
    }


def one_pass(fn, groups, sums, marks) -> float:
    """Seconds to add every row group, the marks cleared before each (one file per row group) and,
    where the variant sets them, counted after it, as a leaf finds a repeated key."""
    started = time.perf_counter()
    for cells, values in groups:
        marks.fill(0)
        if fn(cells, values, sums, marks) != -1:
            raise AssertionError("a row repeated a key: the cells are not distinct")
        if dense.marked_count(marks) not in (0, len(cells)):  # 0: a variant without marks
            raise AssertionError("fewer cells marked than rows: the cells are not distinct")
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=6_300_000, help="grid cells (6.3M: the shuffled benchmark group's 52,500 paths x 120 dates)")
    parser.add_argument("--rows", type=int, default=1 << 20, help="rows a row group")
    parser.add_argument("--groups", type=int, default=6, help="row groups (rows x groups <= cells)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per variant (median)")
    args = parser.parse_args(argv)
    if args.rows * args.groups > args.cells:
        parser.error("--rows x --groups must not exceed --cells (each row a distinct cell)")
    groups = row_groups(args.cells, args.rows, args.groups)
    sums, marks = np.zeros(args.cells), dense.new_marks(args.cells)
    table = variants(args.cells, args.rows)
    expected = None
    for name, fn in table.items():  # compile, touch every page, and check the sums
        sums.fill(0)
        one_pass(fn, groups, sums, marks)
        if expected is None:
            expected = sums.copy()
        elif not np.array_equal(sums, expected):
            raise AssertionError(f"{name}: sums differ from throttler's")
    seconds = {name: [] for name in table}
    for _ in range(args.repeats):  # interleaved, so a drift of the machine hits every variant alike
        for name, fn in table.items():
            seconds[name].append(one_pass(fn, groups, sums, marks))
    rows = args.rows * args.groups
    base = float(np.median(next(iter(seconds.values()))))
    print(f"{args.groups} row groups of {args.rows:,} distinct cells into a grid of {args.cells:,} cells "
          f"({args.cells * 8 / 1e6:.0f} MB of sums); median of {args.repeats} passes, interleaved; "
          f"{platform.processor() or platform.machine()}, numba {numba.__version__}.\n")
    print("| variant | ms a pass (median) | min-max | ns a row | x throttler |")
    print("|---|---:|---:|---:|---:|")
    for name, times in seconds.items():
        median = float(np.median(times))
        print(f"| {name} | {median * 1e3:.1f} | {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} "
              f"| {median / rows * 1e9:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()

"""Compiled loops of the ``dense`` strategy (numba): grid cells, scatter-add, stamps.

numpy needs a temporary and a pass per step for a row group's cells (widen the
paths, multiply, gather the date codes, add, check the range) and its
``np.add.at`` is a generic ufunc loop. The loops here make one pass each, with
the range checks inside, into reused buffers. Measured in one process on a
shuffled 6M-row file (grid of 6.3M cells; the machine shared, so ratios only):
cells 4 ms against 25 ms for numpy, scatter-add 37 ms against 83 ms for
``np.add.at``. Fusing the cell computation, the add and the stamp into a single
loop was measured too, and was 4-5x *slower* than these separate passes: the
fused loop's random writes into the grid no longer overlap (each waits on its
cache miss), while a loop whose cell indices are already in an array keeps many
misses in flight.

Compiled on the first call per argument types (int32 or int64 paths, date32 or
timestamp dates) and cached on disk (``cache=True``): a fresh process loads the
machine code instead of compiling (see the README's dependency section for
the cold and warm costs).
"""

from __future__ import annotations

import numba
import numpy as np

#: returned by :func:`grid_cells` when every row's key is in the grid
ALL_ROWS_IN_GRID = -1


@numba.njit(cache=True, nogil=True)
def grid_cells(paths, dates, table, lo, step, path_min, n_paths, n_dates, out):
    """Fill ``out[:len(paths)]`` with each row's cell ``(path - path_min) x n_dates + date code``.

    ``table[(date - lo) // step]`` is the date's code, or -1 for a date not in
    the grid. Returns the first row whose key is outside the grid (its path out
    of range, its date not in the table), or ALL_ROWS_IN_GRID.
    """
    n_table = table.shape[0]
    for i in range(paths.shape[0]):
        p = np.int64(paths[i]) - path_min
        offset = np.int64(dates[i]) - lo
        if step != 1:
            if offset % step:
                return i
            offset //= step
        if p < 0 or p >= n_paths or offset < 0 or offset >= n_table:
            return i
        code = table[offset]
        if code < 0:
            return i
        out[i] = p * n_dates + code
    return ALL_ROWS_IN_GRID


@numba.njit(cache=True, nogil=True)
def scatter_add(cells, values, sums):
    """``sums[cells[i]] += values[i]``, NaN values skipped; returns how many were NaN.

    IEEE addition, as numpy's: ``inf + -inf`` gives NaN in the sum.
    """
    nans = 0
    for i in range(cells.shape[0]):
        v = values[i]
        if np.isnan(v):
            nans += 1
        else:
            sums[cells[i]] += v
    return nans


@numba.njit(cache=True, nogil=True)
def add_at(cells, values, sums):
    """``sums[cells[i]] += values[i]``, every value (sums already holding NaN from ``inf + -inf``)."""
    for i in range(cells.shape[0]):
        sums[cells[i]] += values[i]


@numba.njit(cache=True, nogil=True)
def stamp_cells(cells, stamps, stamp):
    """``stamps[cells] = stamp``: which file last had each cell."""
    for i in range(cells.shape[0]):
        stamps[cells[i]] = stamp


def _load_common_signatures() -> None:
    """Compile (or load from the disk cache) the signatures every run meets, at import.

    Workers import this module before their first ``dense`` row group, so the
    load is paid once per worker process rather than inside a timed task; other
    integer widths still compile lazily on first use.
    """
    ints = (numba.int32[::1], numba.int64[::1])
    i64 = numba.int64
    for paths in ints:
        for dates in ints:
            grid_cells.compile((paths, dates, numba.int64[::1], i64, i64, i64, i64, i64, numba.int64[::1]))
    scatter_add.compile((numba.int64[::1], numba.float64[::1], numba.float64[::1]))
    add_at.compile((numba.int64[::1], numba.float64[::1], numba.float64[::1]))
    stamp_cells.compile((numba.int64[::1], numba.uint8[::1], i64))


_load_common_signatures()

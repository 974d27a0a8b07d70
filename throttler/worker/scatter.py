"""Compiled loops of the ``dense`` strategy (numba): grid cells, scatter-add with a bitmap of marks.

numpy needs a temporary and a pass per step for a row group's cells (widen the
paths, multiply, gather the date codes, add, check the range) and its
``np.add.at`` is a generic ufunc loop. The loops here make one pass each, with
the range checks inside, into reused buffers. Measured in one process on a
shuffled 6M-row file (grid of 6.3M cells; the machine shared, so ratios only):
cells 4 ms against 25 ms for numpy, scatter-add 37 ms against 83 ms for
``np.add.at``. Fusing the cell computation, the add and the mark into a single
loop was measured too, and was 4-5x *slower* than these separate passes: the
fused loop's random writes into the grid no longer overlap (each waits on its
cache miss), while a loop whose cell indices are already in an array keeps many
misses in flight.

The write loops go one step further: each asks for the cache line of the cell
it will write :data:`PREFETCH_ROWS_AHEAD` rows later (``llvm.prefetch``, a
hint that never faults), so far more misses are in flight than the processor
finds by itself. Measured on 1M shuffled cells of a 6.3M-cell grid (an AMD
EPYC, 2 MiB L2, 32 MiB L3): 6.5 ms without, 3.3 / 2.6 / 2.3 / 2.3 / 2.6 ms
prefetching 64 / 96 / 128 / 256 / 512 rows ahead; a 6M-row file's scatter-add
went from about 39 to 14 ms inside a leaf. Partitioning the rows by cell range
first (a radix pass, so each part's writes stay in L2) was slower: 11-14 ms.
The add and the duplicate check are one pass (:func:`scatter_add_marking`:
3.3 against 4.0-4.9 ms for two passes), which finds a file's repeated key as
it marks. The marks were uint8 stamps (1 B/cell) and are now a bitmap of the
file's cells (1 bit/cell): the stamps' 6.3 MB were a second cache miss a row,
the bitmap's 790 KB stay in L2. On a day this VM's random accesses ran about
eight times slower than above (a million shuffled rows in 25-28 ms), one
process alone showed no clear gain (20 against 25-28 ms once, equal on a
re-run; a leaf's 0.78 s of scatter-adds either way); two leaves side by side in
the workers, sharing the L3, did: the whole shuffled group 0.925 (0.889-1.023)
of the stamps' time in pairs of processes.

``benchmarks/scatter.py`` measures these variants on the machine it runs on.
On an AMD EPYC VM (2 MiB L2, 32 MiB L3) on 2026-12-03, six 1M-row groups into a
6.3M-cell grid: this loop 14-16 ns a row; no prefetch 1.33-1.66x its time, 32 or
512 rows ahead 0.94-1.02x; without the marks 0.69-0.77x (what the duplicate
check and presence cost); the radix pass 1.70-1.87x; ``np.add.at`` 1.42-1.47x.
Measured and dropped that day: setting each mark without testing it, a file's
repeated key found after it by counting its marks. Alone that loop took
0.87-0.90x this one's time in a fast hour and 1.07x in a slow one; the whole
shuffled group, in pairs of warm processes against this loop (``python
benchmarks/paired.py --a dense-cluster@shuffled --b dense-cluster@shuffled
--b-env PYTHONPATH=<a worktree of this loop> --pairs 9 --rounds 8``), 1.027
(0.881-1.101): no gain where the leaves share the machine with their reads.

Compiled on the first call per argument types (int32 or int64 paths, date32 or
timestamp dates) and cached on disk (``cache=True``): a fresh process loads the
machine code instead of compiling (see the README's dependency section for
the cold and warm costs).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: returned by :func:`grid_cells` when every row's key is in the grid
ALL_ROWS_IN_GRID = -1

#: How many rows ahead the scatter loops prefetch the cell they will write. A
#: shuffled row group's writes land anywhere in a grid far larger than the
#: caches (48 MiB of sums for 50,000 paths x 120 dates): each is a cache miss,
#: and the processor alone keeps only about ten in flight. Asking for the line
#: this far ahead keeps many more in flight (see the module docstring).
PREFETCH_ROWS_AHEAD = 128


@intrinsic
def _prefetch_for_write(typingctx, array, index):
    """LLVM's ``llvm.prefetch`` of ``array[index]``'s cache line, for a write, kept in all cache levels.

    A hint: it never faults, whatever the address, and does nothing where the
    processor has no prefetch instruction.
    """
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        # (address, 1 = write, 3 = keep in every cache level, 1 = data cache)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 1), ir.Constant(i32, 3),
                                ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


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


#: returned by :func:`scatter_add_marking` as its duplicate row when every row had a cell of its own
NO_DUPLICATE = -1


@numba.njit(cache=True, nogil=True)
def scatter_add_marking(cells, values, sums, marks):
    """``sums[cells[i]] += values[i]`` (NaN values skipped) and bit ``cells[i]`` of ``marks`` set, in one pass.

    Returns (NaN count, first duplicate row). IEEE addition, as numpy's:
    ``inf + -inf`` gives NaN in the sum.

    ``marks`` is the file's bitmap (uint8, bit ``c & 7`` of byte ``c >> 3``),
    cleared by the caller before the file: a row whose bit is already set
    repeats a key of the same file, its index is returned (NO_DUPLICATE when
    none) and the loop stops there. A bitmap of a 6.3M-cell grid is 790 KB and
    stays in L2, so each row's only cache miss is its sum's line, which is
    prefetched (uint8 stamps were a second miss a row: see the module docstring).
    """
    nans, n = 0, cells.shape[0]
    for i in range(n):
        if i + PREFETCH_ROWS_AHEAD < n:
            _prefetch_for_write(sums, cells[i + PREFETCH_ROWS_AHEAD])
        c = cells[i]
        byte, bit = c >> 3, np.uint8(1 << (c & 7))
        mark = marks[byte]
        if mark & bit:
            return nans, i
        marks[byte] = mark | bit
        v = values[i]
        if np.isnan(v):
            nans += 1
        else:
            sums[c] += v
    return nans, NO_DUPLICATE


@numba.njit(cache=True, nogil=True)
def add_at_marking(cells, values, sums, marks):
    """``sums[cells[i]] += values[i]`` for every value (sums already holding NaN from ``inf + -inf``)
    and bit ``cells[i]`` of ``marks`` set, in one prefetched pass (sorted cells, a sorted reference's,
    run as fast as a block add)."""
    n = cells.shape[0]
    for i in range(n):
        if i + PREFETCH_ROWS_AHEAD < n:
            _prefetch_for_write(sums, cells[i + PREFETCH_ROWS_AHEAD])
        c = cells[i]
        sums[c] += values[i]
        marks[c >> 3] |= np.uint8(1 << (c & 7))


@numba.njit(cache=True, nogil=True)
def add_columns(into_values, into_present, columns, values, present):
    """``into[:, columns] += values`` and ``into_present[:, columns] |= present``, row by row.

    For adding a grid into a wider one whose dates include its own: numpy's
    fancy-indexed ``+=`` builds a gathered copy and scatters it back (70 ms for
    6M cells; this loop about 10 ms).
    """
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            into_values[r, columns[c]] += values[r, c]
            into_present[r, columns[c]] |= present[r, c]


@numba.njit(cache=True, nogil=True)
def runs_from(cells, start):
    """True when ``cells[i] == start + i`` for every row (rows in grid order, no cell twice or skipped)."""
    for i in range(cells.shape[0]):
        if cells[i] != start + i:
            return False
    return True


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
    add_at_marking.compile((numba.int64[::1], numba.float64[::1], numba.float64[::1], numba.uint8[::1]))
    scatter_add_marking.compile((numba.int64[::1], numba.float64[::1], numba.float64[::1], numba.uint8[::1]))
    runs_from.compile((numba.int64[::1], i64))
    add_columns.compile((numba.float64[:, ::1], numba.bool_[:, ::1], numba.int64[::1], numba.float64[:, ::1],
                         numba.bool_[:, ::1]))


_load_common_signatures()

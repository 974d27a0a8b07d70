"""The ``dense`` strategy: sum over a dense (path x Date) grid, for keys in any order.

``path`` is an integer in a bounded range and ``Date`` takes few distinct values,
so their product is a grid: each row's cell is ``(path - path_min) x n_dates +
date_code``, and the sum is a scatter-add into a float64 accumulator over the
grid, one row group at a time: O(rows), no sort, no hash table. A presence mask
travels with the accumulator, so keys absent from every file are not output,
and the output comes out sorted by (path, Date) by construction.

Tree: the shape of :mod:`throttler.kernels`. Each leaf finds the grid of its
own files' keys from cheap sources; combines and the final task add grids over
their union (block adds, or a column map when the dates differ). A task that
found the group's grid ahead of the leaves was tried and dropped: every leaf
depended on its result, so the scheduler placed them all on its worker, one
after another (3.0 s against 1.5 s for 10 shuffled 6M-row files on 2 workers).

Key domain (measured on a 6M-row, 6-row-group file with 120 dates):

* ``path``: the footer's row-group statistics (min/max), free; the column is
  read only where a row group has none;
* ``Date``: each row group's dictionary page, read straight from the file in
  one read (:mod:`throttler.worker.pages`), against 28 ms a file to decode the
  column and take ``pc.unique``; a chunk without a usable dictionary is decoded
  instead. The data pages are not walked to prove the dictionary complete (12 ms
  a file in Python): every row's key is checked against the grid as the leaf
  reads it, and a key outside it (a writer that fell back to plain encoding
  after its dictionary filled up) starts the leaf again on dates decoded from
  the data (:class:`DomainMissed`; a wrong domain is never a wrong sum).

Date codes: a lookup table indexed by ``(date - lo) / step`` (step: the gcd of
the gaps between the file's distinct dates; one day for dates) maps 1M dates in
1.1 ms, against 6 ms for ``pc.index_in`` and 36 ms for ``np.searchsorted``. The
codes are checked by mapping them back (a wrong domain is an error, never a
wrong sum). Cells and the scatter-add with its marks are compiled loops
(:mod:`throttler.worker.scatter`, numba): on a shuffled 6M-row file, cells
about 4 ms against 25 ms in numpy, the scatter-add about 14 ms with software
prefetch (37 ms without, 83 ms for ``np.add.at``, itself faster than
fancy-index ``+=`` and ``np.bincount``);
like IEEE addition it gives NaN for ``inf + -inf``. numpy computes the cells
only where the dates are too spread out for a lookup table.

Files whose key chunks are byte-identical to the reference's (the group's
first file, as for ``aligned``) are added contiguously into an accumulator of
the reference's rows, with no key decoding; that accumulator is scattered into
the grid once per task, one row group of the reference's keys at a time. When
the reference's rows are a run of the grid's cells (sorted, every path x date
of its range: :mod:`throttler.worker.reference_order`), that accumulator is the
grid's slice instead: one array, nothing scattered at the end.

Duplicates: each file marks the cells it writes in a bitmap of its own
(cleared before the file, OR-ed into the leaf's bitmap of cells seen after it);
a row whose cell the file already marked repeats a key, a DataError naming the
file and the key.

Memory per task: the grid's accumulator (8 B/cell), two bitmaps (1/8 B/cell
each) and, at the leaf's end, the bool presence made from them (1 B/cell), the
reference-rows accumulator when some file matches the reference (8 B/row; none
when it is the grid's slice), and two row groups (the one being added, the next
being read), whatever the number of files.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from dask.sizeof import sizeof

from throttler import storage
from throttler.errors import DataError, MisalignedKeys
from throttler.planning.memory_model import (
    DENSE_LEAF_BYTES_PER_CELL,
)
from throttler.worker import allocator, contract, kernels, pages, prefetch, reference_order
from throttler.worker.kernels import Partial
from throttler.worker.progress import FileProgress

#: The most cells a grid may have, whatever the planner estimated: 2**27 cells is
#: 1.1 GiB of leaf accumulator and presence. A bigger grid is refused at run time
#: with GridTooLarge (a MisalignedKeys, so ``auto`` falls back to ``sum``).
MAX_GRID_CELLS = 1 << 27

#: Largest date lookup table (entries) before coding falls back to a binary search.
MAX_DATE_TABLE_ENTRIES = 1 << 22

#: Grid cells one output row group covers (so it has at most that many rows).
OUTPUT_BLOCK_CELLS = kernels.OUTPUT_ROW_GROUP_ROWS


class GridTooLarge(MisalignedKeys):
    """The group's key grid exceeds MAX_GRID_CELLS: sum it with the hash-based strategy."""


class DomainMissed(DataError):
    """A row's key is outside the leaf's grid: with a grid from dictionary pages, the leaf starts
    again on the decoded dates; with decoded dates, the file changed (a DataError naming it)."""


@dataclass(frozen=True)
class Grid:
    """The group's key domain: paths path_min..path_max, the sorted distinct dates (ns)."""

    path_min: int
    path_max: int
    dates_ns: np.ndarray  #: sorted, distinct, int64 ns since the epoch
    date_type: pa.DataType  #: the output's Date type: the group's first file's

    @property
    def n_dates(self) -> int:
        return len(self.dates_ns)

    @property
    def cells(self) -> int:
        return (self.path_max - self.path_min + 1) * self.n_dates


@dataclass
class Cells:
    """A partial result over a grid: sums and which cells some file had."""

    grid: Grid
    values: np.ndarray  #: float64, one per cell
    present: np.ndarray  #: bool, one per cell

    def add_into(self, values: np.ndarray, present: np.ndarray, target: Grid, first_path: int | None = None) -> None:
        """Add these cells into arrays over ``target``, a grid holding this one (O(cells), no scatter).

        The arrays cover the target's paths from ``first_path`` (its first by
        default), as many whole paths as they hold: a block of the target.
        """
        grid = self.grid
        if not grid.cells or not target.n_dates:
            return
        first_path = target.path_min if first_path is None else first_path
        lo = max(grid.path_min, first_path)
        hi = min(grid.path_max, first_path + len(values) // target.n_dates - 1)
        if lo > hi:
            return
        into_values = values.reshape(-1, target.n_dates)[lo - first_path:hi - first_path + 1]
        into_present = present.reshape(-1, target.n_dates)[lo - first_path:hi - first_path + 1]
        mine_values = self.values.reshape(-1, grid.n_dates)[lo - grid.path_min:hi - grid.path_min + 1]
        mine_present = self.present.reshape(-1, grid.n_dates)[lo - grid.path_min:hi - grid.path_min + 1]
        if grid.n_dates == target.n_dates:  # same dates: plain adds of a block of rows
            into_values += mine_values
            into_present |= mine_present
        else:
            columns = np.searchsorted(target.dates_ns, grid.dates_ns)
            _compiled().add_columns(into_values, into_present, columns, mine_values, mine_present)


@sizeof.register(Cells)
def _sizeof_cells(cells: Cells) -> int:
    return cells.values.nbytes + cells.present.nbytes + cells.grid.dates_ns.nbytes


@dataclass
class ReferenceRows:
    """A partial result of files whose keys are the reference's bytes: sums in the reference's row order.

    A leaf none of whose files scattered returns this instead of a grid (no
    grid allocated, no reference keys read); merges add it like ``aligned``
    accumulators, and scatter it into a grid only if some other leaf made one.
    """

    values: np.ndarray  #: float64, one per reference row
    reference_path: str


@sizeof.register(ReferenceRows)
def _sizeof_reference_rows(rows: ReferenceRows) -> int:
    return rows.values.nbytes


# --------------------------------------------------------------------------- domain


def domain(paths: list[str], date_type: pa.DataType | None = None, decoded: bool = False) -> Grid:
    """The union of the files' key domains, from footers and dictionary pages where possible.

    The grid's Date type is ``date_type`` (the group's first file's), else the first file's.
    The dates come from each chunk's dictionary page alone, unchecked against its
    data pages (a writer that fell back to plain encoding may have written other
    dates there): the leaf finds such a date as it reads (:class:`DomainMissed`)
    and starts again with ``decoded=True``, the dates decoded from the data.
    """
    lo, hi, dates = None, None, []
    for path in paths:
        pf = contract.open_parquet(path)
        schema = contract.check_schema(pf, path)
        date_type = date_type or schema.date_type
        if schema.num_rows == 0:
            continue
        p_lo, p_hi = _path_range(pf, path)
        lo, hi = (p_lo, p_hi) if lo is None else (min(lo, p_lo), max(hi, p_hi))
        dates.append(_decoded_dates_ns(pf, path) if decoded else _file_dates_ns(pf, path))
    if lo is None:
        return Grid(0, -1, np.empty(0, np.int64), date_type)
    return _checked(Grid(int(lo), int(hi), np.unique(np.concatenate(dates)), date_type), paths[0])


def _checked(grid: Grid, where: str) -> Grid:
    if grid.cells > MAX_GRID_CELLS:
        raise GridTooLarge(f"{where}: the key grid of {grid.cells:,} cells (paths {grid.path_min}..{grid.path_max}"
                           f" x {grid.n_dates} dates) exceeds {MAX_GRID_CELLS:,}: keys too sparse for dense")
    return grid


def union(grids: list[Grid], where: str) -> Grid:
    """The smallest grid holding every one of ``grids`` (their Date type: the first's)."""
    full = [g for g in grids if g.cells]
    if not full:
        return grids[0]
    dates = np.unique(np.concatenate([g.dates_ns for g in full]))
    return _checked(Grid(min(g.path_min for g in full), max(g.path_max for g in full), dates,
                         grids[0].date_type), where)


def _path_range(pf, path: str) -> tuple[int, int]:
    """(min, max) of ``path`` over the file: row-group statistics, else the decoded column."""
    md, index = pf.metadata, _column_index(pf, "path")
    lows, highs = [], []
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(index).statistics
        if stats is not None and stats.has_min_max:
            lows.append(int(stats.min))
            highs.append(int(stats.max))
        elif md.row_group(rg).num_rows:
            values = _read_row_group(pf, rg, ["path"], path).column(0).to_numpy()
            lows.append(int(values.min()))
            highs.append(int(values.max()))
    return min(lows), max(highs)


def _file_dates_ns(pf, path: str) -> np.ndarray:
    """A file's distinct dates as ns: its chunks' dictionary pages (one small read each), else decoded."""
    md, index = pf.metadata, _column_index(pf, "Date")
    stored = _stored_date_type(pf, index)
    found = []
    with storage.open_input(path) as source:
        for rg in range(md.num_row_groups):
            try:
                if stored is None:
                    raise pages.NotReadable("no plain date or timestamp logical type")
                raw = pages.dictionary_values(md.row_group(rg).column(index), source)
                found.append(contract.date_to_ns(pa.chunked_array([pa.array(raw).view(stored)]), path))
            except pages.NotReadable:
                found.append(_row_group_dates_ns(pf, rg, path))
    return _distinct_ns(found)


def _decoded_dates_ns(pf, path: str) -> np.ndarray:
    """A file's distinct dates as ns, decoded from its data (every row group's Date column)."""
    return _distinct_ns([_row_group_dates_ns(pf, rg, path) for rg in range(pf.metadata.num_row_groups)])


def _row_group_dates_ns(pf, rg: int, path: str) -> pa.ChunkedArray:
    dates = _read_row_group(pf, rg, ["Date"], path).column(0)
    return contract.date_to_ns(dates.unique() if len(dates) else dates, path)


def _distinct_ns(found: list[pa.ChunkedArray]) -> np.ndarray:
    return np.unique(np.concatenate([c.to_numpy().view(np.int64) for c in found if len(c)] or
                                    [np.empty(0, np.int64)]))


def _stored_date_type(pf, index: int) -> pa.DataType | None:
    """The Arrow type of the Date column's physical values (days or a timestamp unit), if plain."""
    column = pf.metadata.schema.column(index)
    logical = column.logical_type.to_json()
    if column.physical_type == "INT32" and '"Date"' in logical:
        return pa.date32()
    if column.physical_type == "INT64" and '"Timestamp"' in logical:
        for name, unit in (("milliseconds", "ms"), ("microseconds", "us"), ("nanoseconds", "ns")):
            if name in logical:
                return pa.timestamp(unit)
    return None


def _column_index(pf, name: str) -> int:
    md = pf.metadata
    return [md.schema.column(i).path for i in range(md.num_columns)].index(name)


def _read_row_group(pf, rg: int, columns: list[str], path: str) -> pa.Table:
    try:
        return pf.read_row_group(rg, columns=columns)
    except contract.DECODE_ERRORS as exc:
        raise contract.decode_error(exc, path, f"cannot decode {columns} in row group {rg}") from None


# --------------------------------------------------------------------------- cells of one file


class _DateCoder:
    """Maps one Date representation's stored integers to their part of a grid cell.

    The part is ``date code - path_min x n_dates``, so a row's cell is
    ``path x n_dates + part``: two passes over the row group's paths, one gather.
    The table is indexed by the stored value itself when dates are small
    non-negative integers (date32 days), else by ``(value - lo) / step``.
    """

    #: The table's entry for a value that is not one of the grid's dates.
    ABSENT = np.iinfo(np.int64).min

    def __init__(self, grid: Grid, date_type: pa.DataType, path: str):
        self.path = path
        native = contract.ns_to_date_type(grid.dates_ns, date_type) if grid.n_dates else pa.array([], date_type)
        back = contract.date_to_ns(pa.chunked_array([native]), path).to_numpy().view(np.int64)
        exact = back == grid.dates_ns  # a date the type cannot represent cannot occur in this file
        self.values = contract.date_order_view(native).astype(np.int64)[exact]
        parts = np.flatnonzero(exact).astype(np.int64) - grid.path_min * grid.n_dates
        self.parts, self.min_part = parts, -grid.path_min * grid.n_dates
        direct = len(self.values) and self.values[0] >= 0 and self.values[-1] < MAX_DATE_TABLE_ENTRIES
        self.lo = 0 if direct or not len(self.values) else int(self.values[0])
        gaps = np.diff(self.values)
        self.step = 1 if direct or not len(gaps) else int(np.gcd.reduce(gaps))
        span = (int(self.values[-1]) - self.lo) // self.step + 1 if len(self.values) else 0
        self.table = self.codes = None
        if span <= MAX_DATE_TABLE_ENTRIES:
            self.table = np.full(max(span, 1), self.ABSENT, np.int64)
            self.table[(self.values - self.lo) // self.step] = parts
            self.codes = np.full(max(span, 1), -1, np.int64)  #: the compiled loop's table: codes, -1 absent
            self.codes[(self.values - self.lo) // self.step] = np.flatnonzero(exact)

    def __call__(self, dates: pa.ChunkedArray) -> np.ndarray:
        """Each row's date part of its cell; a date outside the grid is a DataError."""
        stored = np.concatenate([contract.date_order_view(c) for c in dates.chunks]) if dates.num_chunks != 1 \
            else contract.date_order_view(dates.chunk(0))
        if not len(stored):
            return np.empty(0, np.int64)
        if self.table is None:
            index = np.minimum(np.searchsorted(self.values, stored), len(self.values) - 1)
            if not np.array_equal(self.values[index], stored):
                raise self._outside()
            return self.parts[index]
        offsets = stored if self.lo == 0 and self.step == 1 else stored - self.lo
        if self.step != 1:
            if np.any(offsets % self.step):
                raise self._outside()
            offsets //= self.step
        if offsets.min() < 0 or offsets.max() >= len(self.table):
            raise self._outside()
        parts = self.table[offsets]
        if parts.min() < self.min_part:  # an ABSENT entry
            raise self._outside()
        return parts

    def _outside(self) -> DataError:
        return DomainMissed(f"{self.path}: a Date outside the group's key domain (its dictionary page"
                         " does not list every date its pages hold, or the file changed)")


def _cells(paths: pa.ChunkedArray, parts: np.ndarray, grid: Grid, path: str) -> np.ndarray:
    """Grid cells of one row group's keys: path x n_dates + the date's part; checked in range."""
    p = paths.to_numpy() if paths.num_chunks == 1 else np.concatenate([c.to_numpy() for c in paths.chunks])
    cells = p.astype(np.int64)
    cells *= grid.n_dates
    cells += parts
    if len(cells) and (cells.min() < 0 or cells.max() >= grid.cells):
        raise DomainMissed(f"{path}: a path outside the group's key domain (footer statistics wrong, or the"
                        " file changed)")
    return cells


class CellCoders:
    """One date coder per Date type met in a task (a group may mix representations).

    Cells come from the compiled loop (:mod:`throttler.worker.scatter`) into one
    buffer reused from row group to row group (a result is valid until the next
    call); numpy computes them when the dates are too spread out for a table.
    """

    def __init__(self, grid: Grid):
        self.grid, self._by_type = grid, {}
        self._buffer = np.empty(0, np.int64)
        _compiled()  # numba's import and cache load: once per process, not where graphs are built

    def cells(self, table: pa.Table, path: str) -> np.ndarray:
        paths, dates = contract.key_columns(table, path)
        coder = self._coder(dates.type, path)
        if coder.codes is None:
            return _cells(paths, coder(dates), self.grid, path)
        return self._compiled_cells(_one_array(paths), _one_array(dates, contract.date_order_view), coder, path)

    def _coder(self, date_type: pa.DataType, path: str) -> _DateCoder:
        coder = self._by_type.get(date_type)
        if coder is None:
            coder = self._by_type[date_type] = _DateCoder(self.grid, date_type, path)
        return coder

    def _out(self, rows: int) -> np.ndarray:
        if len(self._buffer) < rows:
            self._buffer = np.empty(rows, np.int64)
        return self._buffer[:rows]

    def _compiled_cells(self, paths: np.ndarray, dates: np.ndarray, coder: _DateCoder, path: str) -> np.ndarray:
        out, grid = self._out(len(paths)), self.grid
        bad = _compiled().grid_cells(paths, dates, coder.codes, coder.lo, coder.step, grid.path_min,
                                     grid.path_max - grid.path_min + 1, grid.n_dates, out)
        if bad != _compiled().ALL_ROWS_IN_GRID:
            raise _missed(path, paths[bad])
        return out


def _missed(path: str, path_key) -> DomainMissed:
    return DomainMissed(f"{path}: a key outside the group's key domain (path {path_key}: footer statistics"
                        " wrong, a dictionary page not listing every date, or the file changed)")


def _compiled():
    """:mod:`throttler.worker.scatter`, imported on first use (numba takes about half a second to load)."""
    from throttler.worker import scatter

    return scatter


def _one_array(column: pa.ChunkedArray, view=None) -> np.ndarray:
    """A contiguous numpy array of a column of one row group (zero-copy when it has one chunk)."""
    view = view or (lambda chunk: chunk.to_numpy())
    return view(column.chunk(0)) if column.num_chunks == 1 else np.concatenate([view(c) for c in column.chunks])


def _scatter(sums: np.ndarray, marks: np.ndarray, cells: np.ndarray, column: pa.ChunkedArray,
             pf, path: str) -> int:
    """Add one row group's values into ``sums`` at ``cells``, marking them in the file's bitmap (NaN
    and nulls skipped); returns their count. A cell the file already marked is a duplicated key: a
    DataError naming it."""
    values = column.to_numpy() if column.null_count == 0 else column.to_numpy(zero_copy_only=False)
    nans, duplicate = _compiled().scatter_add_marking(cells, np.ascontiguousarray(values, np.float64), sums,
                                                      marks)
    if duplicate != _compiled().NO_DUPLICATE:  # the file opened again: a thread may be reading ahead in pf
        contract.sort_keys(*contract.read_keys(contract.open_parquet(path), path), path)  # raises with the key
        raise DataError(f"{path}: duplicated (path, Date) key")
    return int(nans)


def _values(column: pa.ChunkedArray, part: Partial) -> np.ndarray:
    """float64 values of one row group with NaN replaced by 0 (and counted)."""
    values = column.to_numpy() if column.null_count == 0 else column.to_numpy(zero_copy_only=False)
    values, nans = kernels._skip_nans(values.astype(np.float64, copy=False))
    part.nan_count += nans
    return values


# --------------------------------------------------------------------------- leaf


def new_marks(cells: int) -> np.ndarray:
    """A cleared bitmap of ``cells`` cells: bit ``c & 7`` of byte ``c >> 3`` (uint8, so no byte order)."""
    return np.zeros((cells + 7) // 8, np.uint8)


def marked_count(marks: np.ndarray) -> int:
    """How many cells ``marks`` holds."""
    return int(np.bitwise_count(marks).sum())


def presence(marks: np.ndarray, cells: int) -> np.ndarray:
    """The bool presence of each of ``cells`` cells (a fresh array) from a bitmap."""
    return np.unpackbits(marks, count=cells, bitorder="little").view(bool)


class _Accumulator:
    """The grid's sums and bitmaps of marks, plus the reference-rows sums of byte-identical files.

    The grid is made when the first file that must scatter comes: a leaf whose
    files all match the reference never makes one.
    """

    def __init__(self, paths: list[str], reference_path: str, decoded: bool = False):
        self.paths, self.decoded = paths, decoded
        self.reference = kernels._Reference(reference_path, lazy=True)
        self.grid: Grid | None = None
        self.values = self.coders = None
        self.marks = self.seen = None  #: bitmaps: the cells of the file being added, of the files before it
        self.reference_sums: np.ndarray | None = None  #: allocated when a file matches the reference
        self.largest_chunk_bytes = 0
        self._reference_first_cell: int | None = None
        self._reference_order_known = False

    def _make_grid(self) -> None:
        self.grid = grid = domain(self.paths, self.reference.schema.date_type, self.decoded)
        self.marks, self.seen = new_marks(grid.cells), new_marks(grid.cells)
        self.coders = CellCoders(grid)
        self.values = np.zeros(grid.cells, np.float64)
        if self.reference_sums is not None and self.reference_first_cell() is not None:
            rows = self._reference_slice()
            rows += self.reference_sums  # the matching files' sums so far; from now on they add into the grid
            self.reference_sums = rows

    def reference_first_cell(self) -> int | None:
        """The grid cell of the reference's first row when its rows are a run of the grid's cells
        (:mod:`throttler.worker.reference_order`), else None."""
        if not self._reference_order_known:
            self._reference_first_cell = reference_order.first_cell(
                self.reference.key_chunks, self.grid, self.reference.schema.num_rows,
                lambda: reference_cells(self.reference.path, self.coders))
            self._reference_order_known = True
        return self._reference_first_cell

    def _reference_slice(self) -> np.ndarray:
        first = self._reference_first_cell
        return self.values[first:first + self.reference.schema.num_rows]

    @property
    def one_array(self) -> bool:
        """The reference-rows sums are a slice of the grid's sums."""
        return self.grid is not None and self.reference_sums is not None and self.reference_sums.base is self.values

    def add_file(self, path: str, part: Partial) -> None:
        """Add one file: the aligned add where its key bytes are the reference's, else the scatter-add.

        The reference itself comes last (:func:`_reference_last`): when no other file
        of the leaf matched its bytes, it is scattered like any other file, which
        saves the reference-rows array and a second read of its keys.
        """
        pf = contract.open_checked(path)
        schema = contract.check_schema(pf, path)
        alone = path == self.reference.path and self.reference_sums is None
        if not alone and self.reference.same_key_bytes(pf, path, schema):
            self._add_aligned(pf, path, part)
        else:
            self._add_scattered(pf, path, part)
        part.files += 1
        part.bytes_read += storage.size_bytes(path)

    def _add_aligned(self, pf, path: str, part: Partial) -> None:
        if self.reference_sums is None:
            self.reference_sums = self._reference_slice() \
                if self.grid is not None and self.reference_first_cell() is not None \
                else np.zeros(self.reference.schema.num_rows, np.float64)
        offset = 0
        for rg in range(pf.metadata.num_row_groups):
            values = _values(_read_row_group(pf, rg, [contract.VALUE_COLUMN], path).column(0), part)
            window = self.reference_sums[offset:offset + len(values)]
            np.add(window, values, out=window)
            offset += len(values)
            self.largest_chunk_bytes = max(self.largest_chunk_bytes, values.nbytes)

    def _add_scattered(self, pf, path: str, part: Partial) -> None:
        if self.grid is None:
            self._make_grid()
        self.marks.fill(0)
        held = 2  # the row group being added, and the next one being read
        with contextlib.closing(_row_groups(pf, path)) as tables:
            for table in tables:
                cells = self.coders.cells(table, path)
                part.nan_count += _scatter(self.values, self.marks, cells, table.column(contract.VALUE_COLUMN), pf,
                                           path)
                self.largest_chunk_bytes = max(self.largest_chunk_bytes, held * table.nbytes + 2 * cells.nbytes)
        np.bitwise_or(self.seen, self.marks, out=self.seen)

    def finish(self) -> Cells | ReferenceRows:
        """The grid's sums and presence, the reference-rows sums scattered in; or those sums alone."""
        if self.grid is None:
            return ReferenceRows(self.reference_sums, self.reference.path)
        if self.one_array:  # the reference's cells are the slice: so are the matching files'
            self.marks = None
            present = presence(self.seen, self.grid.cells)
            first = self._reference_first_cell
            present[first:first + self.reference.schema.num_rows] = True
        else:
            if self.reference_sums is not None:
                self.marks.fill(0)
                scatter_reference_rows(self.reference_sums, self.reference.path, self.values, self.marks,
                                       self.coders)
                np.bitwise_or(self.seen, self.marks, out=self.seen)
            self.marks = None
            present = presence(self.seen, self.grid.cells)
        self.reference_sums = self.seen = None
        return Cells(self.grid, self.values, present)


def reference_cells(reference_path: str, coders: CellCoders):
    """The grid cells of the reference's rows, one row group at a time (each valid until the next)."""
    pf = contract.open_checked(reference_path)
    for rg in range(pf.metadata.num_row_groups):
        yield coders.cells(_read_row_group(pf, rg, list(contract.KEY_COLUMNS), reference_path), reference_path)


def scatter_reference_rows(sums: np.ndarray, reference_path: str, values: np.ndarray, marks: np.ndarray,
                           coders: CellCoders) -> None:
    """Add sums in the reference's row order into a grid at the reference's cells, marking them in
    ``marks`` (a cleared bitmap).

    The reference's keys are read (one row group at a time) and checked unique.
    """
    pf, offset = contract.open_checked(reference_path), 0
    for rg in range(pf.metadata.num_row_groups):
        cells = coders.cells(_read_row_group(pf, rg, list(contract.KEY_COLUMNS), reference_path), reference_path)
        # sums, not inputs: a NaN here is an inf + -inf, which the output must keep
        _compiled().add_at_marking(cells, sums[offset:offset + len(cells)], values, marks)
        offset += len(cells)
    check_unique(marks, pf, reference_path)


def _row_groups(pf, path: str):
    """The file's row groups (the three contract columns), in order, the next one read in a thread
    while the current one is added (one row group more held).

    pyarrow's decoding and the compiled scatter both release the GIL, and a Dask
    worker's pyarrow decodes on one thread (the nanny sets ``OMP_NUM_THREADS=1``),
    so the read and the scatter overlap wherever a core is free; on an object store
    the next row group's GETs overlap the work too. Measured in pairs of warm
    LocalCluster processes (2 workers x 1 thread): a 5-file shuffled group (one
    leaf) took 0.713 (0.653-0.861) of its time, the 10-file group (two leaves,
    both cores busy) 0.949 (0.936-1.077).
    """
    columns = list(contract.REQUIRED_COLUMNS)
    tables = (_read_row_group(pf, rg, columns, path) for rg in range(pf.metadata.num_row_groups))
    return prefetch.ahead(tables)


def check_unique(marks: np.ndarray, pf, path: str) -> None:
    """Every row of the file marked a cell of its own, or it repeats a key (a DataError naming it)."""
    if marked_count(marks) != pf.metadata.num_rows:
        contract.sort_keys(*contract.read_keys(pf, path), path)  # raises with the duplicated key
        raise DataError(f"{path}: duplicated (path, Date) key")


@allocator.with_task_heap
def dense_leaf(paths: list[str], reference_path: str) -> Partial:
    """Sum the files into the grid of their keys; one row group (and one accumulator) held at a time.

    The grid is the leaf's own files' (footers and dictionary pages: milliseconds a
    file); merges add grids into their union. No task computes the group's grid
    ahead: leaves depending on one would all be placed on the worker holding it.
    A key outside a grid taken from dictionary pages starts the leaf again on the
    dates decoded from the data (a writer's fallback to plain encoding).
    """
    started = time.perf_counter()
    try:
        part = _leaf(paths, reference_path, decoded=False)
    except DomainMissed:
        part = _leaf(paths, reference_path, decoded=True)
    part.task_seconds = time.perf_counter() - started
    return part


def _reference_last(paths: list[str], reference_path: str) -> list[str]:
    return [p for p in paths if p != reference_path] + [p for p in paths if p == reference_path]


def _leaf(paths: list[str], reference_path: str, decoded: bool) -> Partial:
    part = Partial(None)
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says: no warning
        acc = _Accumulator(paths, reference_path, decoded)
        part.date_type = acc.reference.schema.date_type
        progress = FileProgress()
        for path in _reference_last(paths, reference_path):
            acc.add_file(path, part)
            progress.add(storage.size_bytes(path))
        progress.send()
        aligned_bytes = 0 if acc.reference_sums is None or acc.one_array else acc.reference_sums.nbytes
        grid_bytes = int(acc.grid.cells * DENSE_LEAF_BYTES_PER_CELL) if acc.grid is not None else 0
        part.data = acc.finish()
    part.peak_bytes = grid_bytes + aligned_bytes + acc.largest_chunk_bytes
    return part

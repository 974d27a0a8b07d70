"""Merges of the ``dense`` strategy: combine and final tasks over grids and reference rows.

A leaf's partial is a grid (:class:`~throttler.worker.dense.Cells`: sums and
presence over the leaf's key domain) or, when none of its files had to
scatter, the sums in the reference file's row order
(:class:`~throttler.worker.dense.ReferenceRows`, no grid made). Merges add
reference rows like ``aligned`` accumulators and grids over the union of their
domains; reference rows meet a grid only where some leaf made one, scattered
into it once at the reference's cells. A final that ends with reference rows
alone writes them exactly as ``aligned`` does.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pyarrow as pa

from throttler.planning.memory_model import DENSE_PARTIAL_BYTES_PER_CELL
from throttler.worker import allocator, contract, kernels, prefetch, reference_order
from throttler.worker.dense import (
    OUTPUT_BLOCK_CELLS,
    CellCoders,
    Cells,
    DomainMissed,
    Grid,
    ReferenceRows,
    domain,
    new_marks,
    presence,
    reference_cells,
    scatter_reference_rows,
    union,
)
from throttler.worker.kernels import Partial
from throttler.worker.output import output_schema, output_table, write_tables


@allocator.with_task_heap
def dense_combine(partials: list[Partial]) -> Partial:
    """Add partials into fresh arrays (inputs may be reused on a retry): grids over their union."""
    started = time.perf_counter()
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says
        out = Partial(_merged([p.data for p in partials]))
    for p in partials:
        out.absorb_stats(p)
    out.peak_bytes = max(out.peak_bytes, (len(partials) + 1) * _held_bytes(out.data))
    out.task_seconds += time.perf_counter() - started
    return out


def _held_bytes(data: Cells | ReferenceRows) -> int:
    if isinstance(data, ReferenceRows):
        return data.values.nbytes
    return data.grid.cells * DENSE_PARTIAL_BYTES_PER_CELL


def _merged(parts: list) -> Cells | ReferenceRows:
    rows = [d for d in parts if isinstance(d, ReferenceRows)]
    grids = [d for d in parts if isinstance(d, Cells)]
    reference = ReferenceRows(kernels._sum_arrays([r.values for r in rows]), rows[0].reference_path) \
        if rows else None
    if not grids:
        return reference
    if reference is None:
        return _added_grids(grids, None)
    try:
        return _with_reference_rows(grids, reference, decoded=False)
    except DomainMissed:  # the reference's dictionary pages do not list all its dates (a writer's fallback)
        return _with_reference_rows(grids, reference, decoded=True)


def _with_reference_rows(grids: list[Cells], reference: ReferenceRows, decoded: bool) -> Cells:
    """The grids added over their union with the reference's domain, the reference rows added in: as a
    block where they are a run of the grid's cells (:mod:`throttler.worker.reference_order`), else scattered."""
    cells = _added_grids(grids, domain([reference.reference_path], decoded=decoded))
    coders = CellCoders(cells.grid)
    first = _reference_first_cell(reference, cells.grid, coders)
    if first is not None:  # the reference's rows are a run of the grid's cells: a block add
        rows = slice(first, first + len(reference.values))
        cells.values[rows] += reference.values
        cells.present[rows] = True
        return cells
    marks = new_marks(cells.grid.cells)
    scatter_reference_rows(reference.values, reference.reference_path, cells.values, marks, coders)
    cells.present |= presence(marks, cells.grid.cells)
    return cells


def _reference_first_cell(reference: ReferenceRows, grid: Grid, coders: CellCoders) -> int | None:
    path = reference.reference_path
    pf = contract.open_parquet(path)
    chunks = contract.key_chunks(pf, path, contract.check_schema(pf, path))
    return reference_order.first_cell(chunks, grid, len(reference.values), lambda: reference_cells(path, coders))


def _added_grids(grids: list[Cells], reference_grid: Grid | None) -> Cells:
    """The grids added over their union (and the reference's domain, when reference rows join them)."""
    target = union([c.grid for c in grids] + ([reference_grid] if reference_grid is not None else []),
                   "dense combine")
    if all(_same_grid(c.grid, target) for c in grids):  # the common case: leaves of one domain
        values = kernels._sum_arrays([c.values for c in grids])
        present = grids[0].present.copy()
        for c in grids[1:]:
            present |= c.present
        return Cells(target, values, present)
    values, present = np.zeros(target.cells, np.float64), np.zeros(target.cells, bool)
    for c in grids:
        c.add_into(values, present, target)
    return Cells(target, values, present)


def _same_grid(a: Grid, b: Grid) -> bool:
    return (a.path_min, a.path_max, a.n_dates) == (b.path_min, b.path_max, b.n_dates) and bool(
        np.array_equal(a.dates_ns, b.dates_ns))


@allocator.with_task_heap
def dense_final(partials: list[Partial], reference_path: str, output_path: str) -> dict:
    """Add the last partials and write the present cells, sorted by (path, Date) by construction.

    Grids are added one output block at a time as the writer asks for them
    (:func:`_summed_blocks`): the whole sum is never held, and the final touches
    a block's memory, not a fresh grid's (faulting in 54 MB of fresh grid and
    presence cost 0.1-0.3 s on a VM that hands freed memory back to its host).
    """
    started = time.perf_counter()
    kernels.check_not_empty(partials)
    if len(partials) > 1 and all(isinstance(p.data, Cells) for p in partials):
        return _write_summed_grids(partials, output_path, started)
    if len(partials) == 1:
        total = Partial(partials[0].data)
        total.absorb_stats(partials[0])
    else:
        total = dense_combine(partials)
    if isinstance(total.data, ReferenceRows):
        return _write_reference_rows(total, reference_path, output_path, started)
    grid = total.data.grid
    schema = output_schema(grid.date_type)
    dates = _output_dates(grid)
    rows = int(np.count_nonzero(total.data.present))
    with contextlib.closing(prefetch.ahead(_output_blocks(_grid_blocks(total.data), grid, dates))) as tables:
        written = write_tables(output_path, schema, tables)
    peak = max(total.peak_bytes, grid.cells * DENSE_PARTIAL_BYTES_PER_CELL + _block_bytes(grid))
    return kernels._summary(total, written, rows, peak, started, output_path, "dense")


def _write_summed_grids(partials: list[Partial], output_path: str, started: float) -> dict:
    """The final over grids alone: their sum written block by block, never held whole."""
    total = Partial(None)
    for p in partials:
        total.absorb_stats(p)
    grids = [p.data for p in partials]
    grid = union([c.grid for c in grids], "dense final")
    dates = _output_dates(grid)
    rows = [0]  # present cells written, counted as the blocks are made
    blocks = _counted(_summed_blocks(grids, grid), rows)
    with contextlib.closing(prefetch.ahead(_output_blocks(blocks, grid, dates))) as tables:
        written = write_tables(output_path, output_schema(grid.date_type), tables)
    peak = max(total.peak_bytes, sum(_held_bytes(c) for c in grids) + 2 * _block_bytes(grid))
    return kernels._summary(total, written, rows[0], peak, started, output_path, "dense")


def _output_dates(grid: Grid) -> pa.Array:
    """The grid's dates as the output's ``Date`` type."""
    return contract.ns_to_date_type(grid.dates_ns, grid.date_type) if grid.n_dates else pa.array([], grid.date_type)


def _block_bytes(grid: Grid) -> int:
    """One output block's arrays: its sums, presence and output columns (rounded up)."""
    return min(OUTPUT_BLOCK_CELLS, grid.cells) * 3 * 24


def _block_paths(grid: Grid) -> int:
    """Whole paths of the grid one output block covers (about OUTPUT_BLOCK_CELLS cells)."""
    return max(1, OUTPUT_BLOCK_CELLS // grid.n_dates)


def _grid_blocks(cells: Cells):
    """(first cell, sums, presence) of each output block of one grid: slices, no copy."""
    grid = cells.grid
    if not grid.cells:
        return
    block_cells = _block_paths(grid) * grid.n_dates
    for start in range(0, grid.cells, block_cells):
        yield start, cells.values[start:start + block_cells], cells.present[start:start + block_cells]


def _summed_blocks(grids: list[Cells], target: Grid):
    """(first cell, sums, presence) of each output block of ``target``: every grid's paths in it added."""
    if not target.cells:
        return
    paths_per_block = _block_paths(target)
    for first_path in range(target.path_min, target.path_max + 1, paths_per_block):
        n_cells = min(paths_per_block, target.path_max - first_path + 1) * target.n_dates
        values, present = np.zeros(n_cells, np.float64), np.zeros(n_cells, bool)
        with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says
            for cells in grids:
                cells.add_into(values, present, target, first_path)
        yield (first_path - target.path_min) * target.n_dates, values, present


def _counted(blocks, rows: list[int]):
    """``blocks`` unchanged, their present cells added to ``rows[0]``."""
    for start, values, present in blocks:
        rows[0] += int(np.count_nonzero(present))
        yield start, values, present


def _write_reference_rows(total: Partial, reference_path: str, output_path: str, started: float) -> dict:
    """Every file matched the reference: the output is ``aligned``'s (its keys checked sorted, unique)."""
    sums = Partial(total.data.values)
    sums.absorb_stats(total)
    sums.task_seconds += time.perf_counter() - started
    summary = kernels.aligned_final([sums], reference_path, output_path)
    summary["strategy"] = "dense"
    return summary


def _output_blocks(blocks, grid: Grid, dates: pa.Array):
    """Output tables of the present cells of ``blocks`` ((first cell, sums, presence) of whole paths
    of the grid, about OUTPUT_BLOCK_CELLS cells each).

    A block whose cells are all present (the common case: every file had every
    key) is its paths repeated, one Date column built once for every such block,
    and a slice of the sums: no index, no gather (the mixed group's final spent
    40-150 ms building blocks the general way, for 100 ms of encoding).
    """
    full_dates = None
    for start, values, present in blocks:
        first_path = grid.path_min + start // grid.n_dates
        if present.all():
            if full_dates is None or len(full_dates) != len(present):
                full_dates = dates.take(pa.array(np.tile(np.arange(grid.n_dates), len(present) // grid.n_dates)))
            paths = np.repeat(np.arange(first_path, first_path + len(present) // grid.n_dates), grid.n_dates)
            yield output_table(pa.array(paths), full_dates, values)
            continue
        index = np.flatnonzero(present)
        if not len(index):
            continue
        path_offsets, codes = np.divmod(index, grid.n_dates)
        path_offsets += first_path
        yield output_table(pa.array(path_offsets), dates.take(pa.array(codes)), values[index])

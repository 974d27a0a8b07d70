"""Whether the reference's rows are a run of a grid's cells: then its row-order sums are part of the grid.

A ``dense`` leaf holds two accumulators when its files mix both kinds: the
sums of the files whose key bytes are the reference's, in the reference's row
order, and a grid for the files that must scatter. At its end it decodes the
reference's keys again to scatter the first into the second. When the
reference's rows are consecutive cells of the grid, sorted by (path, Date) (a
full rectangle of paths x the grid's dates, as a simulation writer writes it;
the grid may hold more paths, from a file reaching past the reference's), row
``i`` *is* cell ``first + i``: the leaf keeps one array, whose slice from
``first`` takes the matching files' contiguous adds while the other files
scatter into the whole, and the slice's cells are all present. No second
accumulator is allocated and no reference rows are scattered at the end.

The proof decodes the reference's keys once and checks that their cells run
``first, first + 1, ...`` (stopping at the first row group that does not). A
positive answer is remembered in the worker process, keyed by a digest of the
reference's encoded key chunks and the grid: identical key bytes decode to
identical keys, so a later leaf whose reference has the same key bytes (the
same writer's paths and dates, as the aligned files of an estate have) skips
the decode. The digest is BLAKE2b-256 over the chunks with their lengths; a
negative answer is not remembered (it costs at most the row groups up to the
first out-of-order one).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

#: Positive answers kept per worker process (a 32-byte digest, the grid's description, the first cell).
KNOWN_GRID_ORDERS = 64

_known: OrderedDict[tuple, int] = OrderedDict()
_known_lock = threading.Lock()


def first_cell(key_chunks: list[bytes], grid, num_rows: int,
               row_group_cells: Callable[[], Iterable[np.ndarray]]) -> int | None:
    """The cell of the reference's first row when its ``num_rows`` rows are consecutive cells of
    ``grid`` in order (row ``i`` is cell ``first + i``), else None.

    ``key_chunks``: the reference's encoded key chunks (:func:`throttler.worker.contract.key_chunks`);
    ``row_group_cells``: yields the grid cells of the reference's rows, one row group at a time
    (called only when the answer is not known already). A key outside the grid raises
    from there, as it would anywhere else in the leaf.
    """
    if not 0 < num_rows <= grid.cells:
        return None
    key = _key(key_chunks, grid)
    with _known_lock:
        if key in _known:
            _known.move_to_end(key)
            return _known[key]
    first = _first_of_run(row_group_cells(), num_rows)
    if first is None:
        return None
    with _known_lock:
        _known[key] = first
        while len(_known) > KNOWN_GRID_ORDERS:
            _known.popitem(last=False)
    return first


def known_count() -> int:
    """How many positive answers this process remembers."""
    with _known_lock:
        return len(_known)


def forget() -> None:
    """Forget every remembered answer (for tests)."""
    with _known_lock:
        _known.clear()


def _first_of_run(row_group_cells: Iterable[np.ndarray], num_rows: int) -> int | None:
    from throttler.worker import scatter

    first = offset = None
    for cells in row_group_cells:
        if not len(cells):
            continue
        if first is None:
            first = offset = int(cells[0])
        if not scatter.runs_from(cells, offset):
            return None
        offset += len(cells)
    return first if first is not None and offset - first == num_rows else None


def _key(key_chunks: list[bytes], grid) -> tuple:
    digest = hashlib.blake2b(digest_size=32)
    for part in key_chunks:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return (digest.digest(), grid.path_min, grid.path_max, grid.dates_ns.tobytes(), str(grid.date_type))

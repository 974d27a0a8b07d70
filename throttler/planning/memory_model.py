"""The memory model (pure): what one task and one group of a plan hold at their peak.

Each constant is calibrated on measured peak RSS; the measurements behind them
are in benchmarks/README.md, "Where the model's constants come from".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from throttler.planning.plan import STRATEGIES, FileInfo, merge_levels

MIB = 2**20


#: Slack on every task: allocator pages kept after frees and Dask's per-task bookkeeping.
TASK_OVERHEAD_BYTES = 32 * MIB


#: Decoded-per-on-disk bytes assumed when a file's footer is unknown (above any file measured).
DEFAULT_EXPANSION = 1.5


#: A float64 accumulator: the aligned strategy's partial result (a combine of k holds k + 1).
ACCUMULATOR_BYTES_PER_ROW = 8


#: Aligned combine beyond its (k + 1) accumulators: one accumulator more on a 2-thread worker.
ALIGNED_COMBINE_EXTRA_BYTES_PER_ROW = 8

#: Aligned final beyond its inputs: stored keys, output table, encoded file, a rare sort (the whole-table way).
ALIGNED_FINAL_EXTRA_BYTES_PER_ROW = 56


#: Sum leaf: Series accumulator, the next file's table and Series, the add result (files stream: it levels off).
SUM_LEAF_BYTES_PER_ROW = 136


#: A sum partial result: a Series on a (path, Date) MultiIndex, 13 B/row by ``dask.sizeof``, rounded up.
SUM_RESULT_BYTES_PER_ROW = 16


#: Sum combine, fixed part (inputs arrive unpickled from the network); plus one merge input per input.
SUM_COMBINE_BASE_BYTES_PER_ROW = 40

#: Sum combine and final, per input merged: worker RSS grows about twice what a held partial weighs.
SUM_MERGE_BYTES_PER_INPUT_ROW = 30


#: Sum final, fixed part (sort, index levels to arrays, output table, writer); plus one merge input per input.
SUM_FINAL_BASE_BYTES_PER_ROW = 64


#: A groupby partial result: a (path, Date, value) frame, 3 x 8 B/row.
GROUPBY_RESULT_BYTES_PER_ROW = 24


#: Groupby leaf, fixed part (the regroup's codes, order and sums, the grouped result);
#: plus :data:`GROUPBY_FILE_BYTES_PER_ROW` per file.
GROUPBY_LEAF_BASE_BYTES_PER_ROW = 24


#: Groupby leaf, per file: its table and key arrays, and its rows in the regroup's arrays.
GROUPBY_FILE_BYTES_PER_ROW = 56


#: Groupby combine and final (sort and write stay below the regroup's peak), fixed part;
#: plus one partial per input.
GROUPBY_COMBINE_BASE_BYTES_PER_ROW = 36


#: Groupby combine, per input: the partial held and its rows in the regroup's arrays.
GROUPBY_PARTIAL_BYTES_PER_ROW = 70

#: Dense leaf, per grid cell, at its end: float64 sums, the bitmap of cells seen
#: (1/8 B) and the bool presence made from it (the file's own bitmap freed
#: first). A dense partial: float64 sums and a bool presence mask.
DENSE_LEAF_BYTES_PER_CELL = 8 + 1 / 8 + 1
DENSE_PARTIAL_BYTES_PER_CELL = 9

#: Dense leaf, once per worker process: numba, LLVM and the compiled loops of
#: throttler.worker.scatter, loaded at the worker's first dense task and kept.
#: Measured 140 MiB of RSS on top of a worker's baseline (which the budget
#: leaves out); counted in every dense leaf, as the leaf may be the first.
#: What stays after that leaf, trimmed (108 MiB measured), is the worker's
#: from then on: it reports it and its budgets lose it
#: (``throttler.cluster.snapshot.NUMBA_RESIDENT_BYTES``), so on such a worker a
#: dense leaf's estimate counts the code a second time, on the safe side.
DENSE_COMPILED_CODE_BYTES = 144 * MIB

#: Dense final, beyond its inputs: one output row group being prepared and one
#: being encoded (2**20 rows x (path + Date + value + index) x 2, rounded up). With
#: two encoded at once (``output_encode_threads``) a third block and two encoded
#: parts are held: measured 58-111 MiB beyond the inputs, inside this plus the
#: k + 1'th grid that a final over grids alone never makes.
DENSE_OUTPUT_BLOCK_BYTES = 80 * MIB


def expansion(files: Iterable[FileInfo]) -> float:
    """Decoded bytes per on-disk byte over the files whose footer is known."""
    known = [f for f in files if f.decoded_bytes > 0 and f.size_bytes > 0]
    if not known:
        return DEFAULT_EXPANSION
    return sum(f.decoded_bytes for f in known) / sum(f.size_bytes for f in known)


def naive_group_bytes(files: list[FileInfo], expansion_factor: float | None = None) -> int:
    """The base model: every file of the group decoded in memory at once."""
    factor = expansion(files) if expansion_factor is None else expansion_factor
    return math.ceil(sum(f.size_bytes for f in files) * factor)


def decoded_bytes_of(f: FileInfo) -> int:
    """The file's uncompressed size, from the footer or else from the default expansion."""
    return f.decoded_bytes if f.decoded_bytes > 0 else math.ceil(f.size_bytes * DEFAULT_EXPANSION)


def rows_of(f: FileInfo) -> int:
    """The file's rows, or an upper bound when the footer is unknown.

    The float64 ``value`` column alone takes 8 decoded bytes a row, so
    decoded bytes / 8 never under-counts rows.
    """
    return f.rows if f.rows > 0 else -(-decoded_bytes_of(f) // ACCUMULATOR_BYTES_PER_ROW)


@dataclass(frozen=True)
class TaskPeaks:
    """Peak bytes of each task shape of a plan, and of one partial result."""

    leaf_bytes: int
    combine_bytes: int  #: 0 when the plan has no combine task (leaves <= fan-in)
    final_bytes: int
    result_bytes: int  #: one partial result held between tasks

    @property
    def peak_bytes(self) -> int:
        """The largest task: what must fit one worker."""
        return max(self.leaf_bytes, self.combine_bytes, self.final_bytes)

    def scaled(self, factor: float) -> "TaskPeaks":
        return TaskPeaks(*(math.ceil(v * factor) for v in (
            self.leaf_bytes, self.combine_bytes, self.final_bytes, self.result_bytes)))


def largest_file(files: Iterable[FileInfo]) -> FileInfo:
    """A file as large as the group's largest in every respect (a safe stand-in)."""
    files = list(files)
    known = all(f.path_min is not None and f.path_max is not None for f in files)
    return FileInfo(path="(largest)", size_bytes=max(f.size_bytes for f in files),
                    rows=max(rows_of(f) for f in files),
                    decoded_bytes=max(decoded_bytes_of(f) for f in files),
                    path_min=min(f.path_min for f in files) if known else None,
                    path_max=max(f.path_max for f in files) if known else None,
                    date_count=max(f.date_count for f in files))


def grid_cells(largest: FileInfo) -> int:
    """The dense strategy's grid, estimated from a :func:`largest_file` stand-in: its path range x
    the most distinct dates a file's first row group has (exact when files share their dates, as
    simulation files do); without footer statistics, the largest file's rows."""
    if largest.path_min is None or largest.path_max is None or largest.date_count <= 0:
        return rows_of(largest)
    return (largest.path_max - largest.path_min + 1) * largest.date_count


def raw_task_peaks(strategy: str, largest: FileInfo, files_per_task: int,
                   fan_in: int, n_leaves: int) -> TaskPeaks:
    """Uncorrected peaks of a plan's tasks, for the tree :mod:`throttler.worker.graphs` builds.

    Leaves read ``files_per_task`` files each; combine tasks (only when there
    are more than ``fan_in`` leaves) add ``fan_in`` partials; the final task
    adds the last ``min(n_leaves, fan_in)`` partials and writes the output.
    """
    combine_inputs = fan_in if n_leaves > fan_in else 0
    final_inputs = max(1, min(n_leaves, fan_in))
    if strategy == "aligned":
        peaks = _aligned_peaks(largest, combine_inputs, final_inputs)
    elif strategy == "sum":
        peaks = _sum_peaks(largest.rows, combine_inputs, final_inputs)
    elif strategy == "groupby":
        peaks = _groupby_peaks(largest.rows, files_per_task, combine_inputs, final_inputs)
    elif strategy == "dense":
        peaks = _dense_peaks(largest, combine_inputs, final_inputs)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return peaks


def _task_bytes(rows: int, bytes_per_row: int) -> int:
    return rows * bytes_per_row + TASK_OVERHEAD_BYTES


def _aligned_peaks(largest: FileInfo, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    """A leaf holds its accumulator, the file's on-disk bytes (memory-mapped pages
    count in RSS) and its decoded bytes (row-group buffers, a safe bound).

    On an object store the same bound holds: a leaf fetches one file's value
    chunks at a time (:mod:`throttler.worker.store_reads`), so at most that
    file's encoded chunks and decoded arrays are held; the files opened ahead
    hold only footers and key chunks (1.5% of a seed file), inside the slack."""
    rows, acc = largest.rows, ACCUMULATOR_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=rows * acc + largest.size_bytes + largest.decoded_bytes + TASK_OVERHEAD_BYTES,
        combine_bytes=(_task_bytes(rows, (combine_inputs + 1) * acc + ALIGNED_COMBINE_EXTRA_BYTES_PER_ROW)
                       if combine_inputs else 0),
        final_bytes=_task_bytes(rows, (final_inputs + 1) * acc + ALIGNED_FINAL_EXTRA_BYTES_PER_ROW),
        result_bytes=rows * acc,
    )


def _dense_peaks(largest: FileInfo, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    """Dense: leaves hold the grid's sums and presence, the reference-rows sums and, like an
    aligned leaf, the file mapped plus its decoded bytes (a bound on one row group); files
    are streamed, so files per leaf cost no memory. Merges hold k + 1 grids of partials (a final
    over grids alone holds its k and two output blocks: k + 1 bounds it and the final that meets
    reference rows, which adds them into a fresh grid first)."""
    cells, rows = grid_cells(largest), largest.rows
    cell = DENSE_PARTIAL_BYTES_PER_CELL
    return TaskPeaks(
        leaf_bytes=(int(cells * DENSE_LEAF_BYTES_PER_CELL) + rows * ACCUMULATOR_BYTES_PER_ROW + largest.size_bytes
                    + largest.decoded_bytes + TASK_OVERHEAD_BYTES + DENSE_COMPILED_CODE_BYTES),
        combine_bytes=cells * cell * (combine_inputs + 1) + TASK_OVERHEAD_BYTES if combine_inputs else 0,
        final_bytes=cells * cell * (final_inputs + 1) + DENSE_OUTPUT_BLOCK_BYTES + TASK_OVERHEAD_BYTES,
        result_bytes=cells * cell,
    )


def _sum_peaks(rows: int, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    per_input = SUM_MERGE_BYTES_PER_INPUT_ROW
    return TaskPeaks(
        leaf_bytes=_task_bytes(rows, SUM_LEAF_BYTES_PER_ROW),
        combine_bytes=(_task_bytes(rows, SUM_COMBINE_BASE_BYTES_PER_ROW + combine_inputs * per_input)
                       if combine_inputs else 0),
        final_bytes=_task_bytes(rows, SUM_FINAL_BASE_BYTES_PER_ROW + final_inputs * per_input),
        result_bytes=rows * SUM_RESULT_BYTES_PER_ROW,
    )


def _groupby_peaks(rows: int, files_per_task: int, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    def combine(inputs: int) -> int:
        return _task_bytes(rows, GROUPBY_COMBINE_BASE_BYTES_PER_ROW + inputs * GROUPBY_PARTIAL_BYTES_PER_ROW)

    return TaskPeaks(
        leaf_bytes=_task_bytes(rows, GROUPBY_LEAF_BASE_BYTES_PER_ROW
                               + files_per_task * GROUPBY_FILE_BYTES_PER_ROW),
        combine_bytes=combine(combine_inputs) if combine_inputs else 0,
        final_bytes=combine(final_inputs),
        result_bytes=rows * GROUPBY_RESULT_BYTES_PER_ROW,
    )


def merge_task_count(n_leaves: int, fan_in: int) -> int:
    """Combine tasks plus the final task of the group's tree (:func:`~throttler.planning.plan.merge_levels`)."""
    return 1 + sum(merge_levels(n_leaves, fan_in))


def group_peak_parts(peaks: TaskPeaks, n_leaves: int, concurrent_tasks: int, fan_in: int) -> tuple[int, int]:
    """(running bytes, waiting bytes): the most one group holds across the cluster at once.

    At most ``concurrent_tasks`` of its tasks run at once (the cluster's
    threads); they cost at most the most expensive tasks of the tree taken
    that many times. Besides them, finished partial results wait for their
    merge: ``dask.order`` ranks a ready combine above leaves not yet started,
    so about ``concurrent_tasks x fan_in`` results wait at most, and never
    more than there are leaves. Admission caps the running part summed over
    all groups, since the cluster's threads run that many tasks in all.
    """
    n_merges = merge_task_count(n_leaves, fan_in)
    running = max(1, min(concurrent_tasks, n_leaves + n_merges))
    merge_bytes = max(peaks.combine_bytes, peaks.final_bytes)
    if merge_bytes >= peaks.leaf_bytes:
        merges = min(running, n_merges)
        running_bytes = merges * merge_bytes + (running - merges) * peaks.leaf_bytes
    else:
        leaves = min(running, n_leaves)
        running_bytes = leaves * peaks.leaf_bytes + (running - leaves) * merge_bytes
    waiting = min(n_leaves, running * fan_in) if n_leaves > 1 else 0
    return running_bytes, waiting * peaks.result_bytes


def group_peak_bytes(peaks: TaskPeaks, n_leaves: int, concurrent_tasks: int, fan_in: int) -> int:
    """The sum of :func:`group_peak_parts`."""
    return sum(group_peak_parts(peaks, n_leaves, concurrent_tasks, fan_in))

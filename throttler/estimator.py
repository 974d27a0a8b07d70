"""The memory model: what one task and one group of a plan hold at their peak.

Two models live here. The *base* model is what operators first asked for: a
group costs ``n_files x file size x expansion``, the expansion read from the
Parquet footers (:func:`naive_group_bytes`). The *strategy* model prices each
task shape of a plan (leaf, combine, final) from the rows of the group's
largest file, with per-row figures measured on real files (see the
constants), and bounds the group by what can run at once
(:func:`group_peak_bytes`).

The :class:`Estimator` corrects the strategy model online from observed peaks
and persists its corrections. The math is pure functions; the class only adds a
lock and the JSON file.

How the constants were measured (2-core VM, numpy 2.4, pandas 3.1, pyarrow 26
with its mimalloc pool): 9 files of 6,000,000 rows (50,000 paths x 120
irregular dates, ``value`` random float64), 50.4 MB on disk each, footer
``total_byte_size`` 55.6 MB (expansion 1.10), 6 row groups. Each task
function of :mod:`throttler.kernels` ran in a fresh process with numpy,
pandas and pyarrow imported; the figure is the peak RSS (VmHWM, reset through
``/proc/self/clear_refs``) minus the RSS just before the task, which is what
Dask's memory thresholds see. Combine and final inputs (pickled leaf results)
were loaded inside the window. Repeated runs agreed within a few percent
except where noted. "B/row" is bytes per row of one file.

Assumption: the files of a group share their keys (simulation outputs do), so
a partial result has about as many rows as one file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from throttler import pages
from throttler.errors import DataError
from throttler.plan import STRATEGIES, FileInfo

log = logging.getLogger(__name__)

MIB = 2**20

#: Slack added to every task: allocator pages kept after frees (pyarrow's
#: mimalloc pool, glibc arenas) and Dask's per-task bookkeeping (5.6 B/row on
#: a 6M-row file). Measured shapes exceeded their array arithmetic by up to 25 MiB.
TASK_OVERHEAD_BYTES = 32 * MIB

#: Decoded-per-on-disk bytes assumed when a file's footer is unknown. Measured
#: 1.10 on the simulation files (random float64 does not compress); 1.5 leaves room.
DEFAULT_EXPANSION = 1.5

#: A float64 accumulator: the aligned strategy's partial result.
#: Aligned leaf = accumulator + the file's on-disk bytes (it is memory-mapped,
#: and mapped pages count in RSS) + its decoded bytes (row-group buffers, a
#: safe bound). Measured 128 MB (21 B/row) streaming 1, 2, 4 or 8 files in six
#: runs, 160 MB once (the first run after writing the files); modelled 188 MB.
#: Aligned combine of k inputs measured exactly (k + 1) x 8 B/row (412 MiB for 8).
ACCUMULATOR_BYTES_PER_ROW = 8

#: Aligned final, beyond adding its k inputs ((k + 1) x 8 B/row): one file's
#: keys as stored, the output table, the Parquet file encoded in memory before
#: its write, and (rarely) a sort permutation with permuted copies. Measured
#: 39 / 47 / 47 B/row beyond the inputs for k = 1 / 2 / 8 (peak RSS of a fresh
#: process running the final on 6M rows), against 8 + 56 = 64 modelled. That
#: was the whole-table final; the streamed one holds a few row groups instead
#: of whole key and output columns, and the model still covers the whole-table
#: way it falls back to when keys are out of order.
ALIGNED_FINAL_EXTRA_BYTES_PER_ROW = 56

#: Sum leaf: the (path, Date)-indexed Series accumulator, the next file's table,
#: keys and Series being built, and the ``add`` result. Files are streamed, so
#: it levels off: measured 60 / 116 / 122 B/row for 1 / 4 / 8 files (a
#: pandas-only variant: 82 / 111 / 123 / 124 B/row for 1 / 3 / 6 / 9 files).
SUM_LEAF_BYTES_PER_ROW = 136

#: A sum partial result held between tasks: a Series with a (path, Date)
#: MultiIndex, values 8 + int32/int8 codes 5 = 13 B/row (``dask.sizeof``).
SUM_RESULT_BYTES_PER_ROW = 16

#: Sum combine, fixed part; plus :data:`SUM_RESULT_BYTES_PER_ROW` per input.
#: Measured 39 / 126 B/row for 2 / 8 inputs loaded from files, 101 / 187 B/row
#: for inputs unpickled from bytes in memory (as received over the network).
SUM_COMBINE_BASE_BYTES_PER_ROW = 64

#: Sum final, fixed part (sort, index levels to arrays, output table, writer);
#: plus :data:`SUM_RESULT_BYTES_PER_ROW` per input. Measured 45 / 70 / 149 B/row
#: for 1 / 2 / 8 inputs.
SUM_FINAL_BASE_BYTES_PER_ROW = 56

#: A groupby partial result: a (path, Date, value) frame, 3 x 8 B/row.
GROUPBY_RESULT_BYTES_PER_ROW = 24

#: Groupby leaf, fixed part (hash table, grouped result); plus
#: :data:`GROUPBY_FILE_BYTES_PER_ROW` per file concatenated. Measured 171 /
#: 268 / 443 / 757 B/row for 1 / 2 / 4 / 8 files per leaf.
GROUPBY_LEAF_BASE_BYTES_PER_ROW = 80

#: Groupby leaf, per file: its table, key arrays, frame and the concat copy.
GROUPBY_FILE_BYTES_PER_ROW = 96

#: Groupby combine (and final: sorting and writing stay below the concat
#: peak), fixed part; plus :data:`GROUPBY_PARTIAL_BYTES_PER_ROW` per input.
#: Measured 208 / 362 / 682 B/row for 2 / 4 / 8 inputs; the final 136 / 208 /
#: 682 B/row for 1 / 2 / 8 inputs.
GROUPBY_COMBINE_BASE_BYTES_PER_ROW = 56

#: Groupby combine, per input concatenated and regrouped.
GROUPBY_PARTIAL_BYTES_PER_ROW = 80

#: Dense leaf, per grid cell: float64 sums and uint8 stamps. A dense partial:
#: float64 sums and a bool presence mask.
DENSE_LEAF_BYTES_PER_CELL = 9
DENSE_PARTIAL_BYTES_PER_CELL = 9

#: Dense final, beyond its inputs: one output row group being prepared and one
#: being encoded (2**20 rows x (path + Date + value + index) x 2, rounded up).
DENSE_OUTPUT_BLOCK_BYTES = 80 * MIB

#: Bounds of the learned correction factor (multiplies every task estimate).
#: The floor is 1: the model above is measured, while the peaks the kernels
#: report are array arithmetic that leaves out allocator and mapped pages
#: (e.g. 54 MiB reported for a 122 MiB leaf), so observations may only add.
MIN_CORRECTION = 1.0
MAX_CORRECTION = 4.0

#: Share of the gap closed by one observation: fast up (an under-estimate
#: risks a killed worker), slow down (an over-estimate only costs throughput).
CORRECTION_UP_ALPHA = 0.75
CORRECTION_DOWN_ALPHA = 0.05

#: Weight of the newest ratio in the reported EWMA of observed / predicted.
ACCURACY_EWMA_ALPHA = 0.2

STATE_VERSION = 1


# --------------------------------------------------------------------------- base model


def file_info(path: str) -> FileInfo:
    """Read one file's footer: size on disk, rows, uncompressed bytes."""
    try:
        size_bytes = os.stat(path).st_size
        md = pq.read_metadata(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read the Parquet footer ({exc})") from None
    decoded = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
    return FileInfo(path=path, size_bytes=size_bytes, rows=md.num_rows, decoded_bytes=decoded,
                    **key_domain_info(path, md))


def key_domain_info(path: str, md: pq.FileMetaData) -> dict:
    """``path_min``/``path_max`` from the footer's statistics (None unless every row group has
    them) and ``date_count`` from the first row group's Date dictionary page header (0 if none)."""
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    if "path" not in names or "Date" not in names or md.num_row_groups == 0:
        return {}
    stats = [md.row_group(i).column(names.index("path")).statistics for i in range(md.num_row_groups)]
    out = {}
    if all(s is not None and s.has_min_max for s in stats):
        out = {"path_min": min(int(s.min) for s in stats), "path_max": max(int(s.max) for s in stats)}
    with contextlib.suppress(OSError, pa.ArrowException), pa.memory_map(path, "r") as source:
        out["date_count"] = pages.dictionary_size(md.row_group(0).column(names.index("Date")), source)
    return out


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


# --------------------------------------------------------------------------- strategy model


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
    """Uncorrected peaks of a plan's tasks, for the tree :mod:`throttler.graphs` builds.

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
    rows, acc = largest.rows, ACCUMULATOR_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=rows * acc + largest.size_bytes + largest.decoded_bytes + TASK_OVERHEAD_BYTES,
        combine_bytes=_task_bytes(rows, (combine_inputs + 1) * acc) if combine_inputs else 0,
        final_bytes=_task_bytes(rows, (final_inputs + 1) * acc + ALIGNED_FINAL_EXTRA_BYTES_PER_ROW),
        result_bytes=rows * acc,
    )


def _dense_peaks(largest: FileInfo, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    """Dense: leaves hold the grid's sums and stamps, the reference-rows sums and, like an
    aligned leaf, the file mapped plus its decoded bytes (a bound on one row group); files
    are streamed, so files per leaf cost no memory. Merges hold k + 1 grids of partials."""
    cells, rows = grid_cells(largest), largest.rows
    cell = DENSE_PARTIAL_BYTES_PER_CELL
    return TaskPeaks(
        leaf_bytes=(cells * DENSE_LEAF_BYTES_PER_CELL + rows * ACCUMULATOR_BYTES_PER_ROW + largest.size_bytes
                    + largest.decoded_bytes + TASK_OVERHEAD_BYTES),
        combine_bytes=cells * cell * (combine_inputs + 1) + TASK_OVERHEAD_BYTES if combine_inputs else 0,
        final_bytes=cells * cell * (final_inputs + 1) + DENSE_OUTPUT_BLOCK_BYTES + TASK_OVERHEAD_BYTES,
        result_bytes=cells * cell,
    )


def _sum_peaks(rows: int, combine_inputs: int, final_inputs: int) -> TaskPeaks:
    per_input = SUM_RESULT_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=_task_bytes(rows, SUM_LEAF_BYTES_PER_ROW),
        combine_bytes=(_task_bytes(rows, SUM_COMBINE_BASE_BYTES_PER_ROW + combine_inputs * per_input)
                       if combine_inputs else 0),
        final_bytes=_task_bytes(rows, SUM_FINAL_BASE_BYTES_PER_ROW + final_inputs * per_input),
        result_bytes=rows * per_input,
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
    """Combine tasks plus the final task of the tree :mod:`throttler.graphs` builds."""
    count, level = 1, n_leaves
    while level > fan_in:
        level = -(-level // fan_in)
        count += level
    return count


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


# --------------------------------------------------------------------------- learning (pure)


@dataclass(frozen=True)
class StrategyStats:
    """What was learned about one strategy's estimates."""

    correction: float = 1.0  #: multiplies the model's task estimates
    count: int = 0  #: observations so far
    last_ratio: float = 0.0  #: observed / predicted of the last observation (0: none)
    ewma_ratio: float = 0.0  #: exponentially weighted observed / predicted (0: none)
    max_ratio: float = 0.0  #: the worst under-estimate seen


def clamp_correction(value: float) -> float:
    return min(MAX_CORRECTION, max(MIN_CORRECTION, value))


def updated_stats(stats: StrategyStats, predicted_bytes: int, observed_bytes: int,
                  factor_used: float | None = None) -> StrategyStats:
    """Fold one observation in.

    ``predicted_bytes`` is the plan's estimate: the raw model times
    ``factor_used``, the factor applied when the plan was made (the correction
    then in force, times any retry safety). The correction that would have
    predicted exactly is therefore ``factor_used x observed / predicted``, and
    the factor moves toward it, fast upward and slowly downward. Using the
    factor of the plan's own time, not today's, keeps groups planned before
    an update from ratcheting the correction up again.
    """
    ratio = observed_bytes / predicted_bytes
    used = stats.correction if factor_used is None else factor_used
    target = clamp_correction(used * ratio)
    alpha = CORRECTION_UP_ALPHA if target > stats.correction else CORRECTION_DOWN_ALPHA
    ewma = ratio if stats.count == 0 else (
        (1 - ACCURACY_EWMA_ALPHA) * stats.ewma_ratio + ACCURACY_EWMA_ALPHA * ratio)
    return StrategyStats(
        correction=clamp_correction(stats.correction + alpha * (target - stats.correction)),
        count=stats.count + 1,
        last_ratio=ratio,
        ewma_ratio=ewma,
        max_ratio=max(stats.max_ratio, ratio),
    )


def stats_from_json(data: object) -> dict[str, StrategyStats]:
    """Parse the persisted state; missing or malformed entries fall back to defaults."""
    table = data.get("strategies", {}) if isinstance(data, dict) else {}
    table = table if isinstance(table, dict) else {}
    out = {}
    for strategy in STRATEGIES:
        entry = table.get(strategy) or {}
        try:
            out[strategy] = _stats_from_entry(entry)
        except (AttributeError, TypeError, ValueError):
            log.warning("estimator state: ignoring malformed entry for %s: %r", strategy, entry)
            out[strategy] = StrategyStats()
    return out


def _stats_from_entry(entry: dict) -> StrategyStats:
    default = StrategyStats()
    return StrategyStats(
        correction=clamp_correction(float(entry.get("correction", default.correction))),
        count=int(entry.get("count", 0)),
        last_ratio=float(entry.get("last_ratio", 0.0)),
        ewma_ratio=float(entry.get("ewma_ratio", 0.0)),
        max_ratio=float(entry.get("max_ratio", 0.0)),
    )


def stats_to_json(stats: dict[str, StrategyStats]) -> dict:
    return {"version": STATE_VERSION, "strategies": {k: asdict(v) for k, v in stats.items()}}


# --------------------------------------------------------------------------- the estimator


class Estimator:
    """Prices plans with the strategy model times a learned per-strategy correction.

    Thread-safe: a lock guards the in-memory table only; the JSON file is
    written outside it (a second lock keeps writes in order). With a
    ``state_path``, corrections are loaded at start and saved at most every
    ``save_every_seconds`` after an observation (each save costs two fsyncs;
    at thousands of groups a minute that was 15% of the completion thread),
    and at once when a correction moved up; :meth:`save` flushes at shutdown.
    A failed save is logged, never raised.
    """

    def __init__(self, state_path: str | os.PathLike | None = None, save_every_seconds: float = 5.0):
        self.state_path = os.fspath(state_path) if state_path is not None else None
        self.save_every_seconds = save_every_seconds
        self._saved_at = float("-inf")
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._stats = load_state(self.state_path) if self.state_path else stats_from_json({})

    def correction(self, strategy: str) -> float:
        """The factor applied to the model's estimates for ``strategy``."""
        _check_strategy(strategy)
        with self._lock:
            return self._stats[strategy].correction

    def task_peaks(self, strategy: str, files: list[FileInfo], *, files_per_task: int,
                   fan_in: int, n_leaves: int, safety: float = 1.0) -> TaskPeaks:
        """Corrected peaks of a plan's tasks, priced on the group's largest file."""
        raw = raw_task_peaks(strategy, largest_file(files), files_per_task, fan_in, n_leaves)
        return raw.scaled(self.correction(strategy) * safety)

    def observe(self, strategy: str, predicted_task_peak_bytes: int, observed_peak_bytes: int,
                factor_used: float | None = None) -> float:
        """Learn from one task's observed peak; returns the new correction.

        ``factor_used`` is the plan's :attr:`~throttler.plan.Plan.estimate_factor`
        (None: the correction in force now). Non-positive figures are ignored.
        """
        _check_strategy(strategy)
        if predicted_task_peak_bytes <= 0 or observed_peak_bytes <= 0:
            log.debug("estimator: ignoring observation %s %s/%s", strategy,
                      observed_peak_bytes, predicted_task_peak_bytes)
            return self.correction(strategy)
        with self._lock:
            before = self._stats[strategy].correction
            stats = updated_stats(self._stats[strategy], predicted_task_peak_bytes, observed_peak_bytes,
                                  factor_used)
            self._stats[strategy] = stats
        now = time.monotonic()
        if self.state_path and (stats.correction > before or now - self._saved_at >= self.save_every_seconds):
            self._saved_at = now
            self.save()
        return stats.correction

    def accuracy(self) -> dict[str, dict[str, float]]:
        """Estimated-vs-observed figures per strategy, for operators and metrics."""
        with self._lock:
            return {k: asdict(v) for k, v in self._stats.items()}

    def save(self) -> None:
        """Write the learned table to ``state_path`` atomically; log on failure."""
        if not self.state_path:
            return
        with self._save_lock:
            with self._lock:
                data = stats_to_json(self._stats)
            try:
                write_json_atomic(self.state_path, data)
            except OSError as exc:
                log.warning("estimator: cannot save state to %s: %s", self.state_path, exc)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def load_state(path: str) -> dict[str, StrategyStats]:
    """Read the persisted table; a missing or corrupt file gives the defaults."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        log.warning("estimator: ignoring unreadable state %s: %s", path, exc)
        data = {}
    return stats_from_json(data)


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON so readers see the old or the new file, never a torn one.

    Temp file in the same directory, fsync, rename over the target, fsync
    the directory (a file's fsync does not persist its directory entry).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".estimator-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""The memory model: what one task and one group of a plan hold at their peak.

Two models live here. The *base* model is what operators first asked for: a
group costs ``n_files x file size x expansion``, the expansion read from the
Parquet footers (:func:`naive_group_bytes`). The *strategy* model prices each
task shape of a plan (leaf, combine, final) from the rows of the largest file,
with per-row figures measured on a real file (see the constants), and bounds
the group by what can run at once (:func:`group_peak_bytes`).

The :class:`Estimator` corrects the strategy model online from observed peaks
and persists its corrections. The math is pure functions; the class only adds a
lock and the JSON file.

Measurement behind the constants (2-core VM, numpy 2.4, pandas 3.1, pyarrow 26
with mimalloc): one file of 6,000,000 rows (50,000 paths x 120 irregular
dates, ``value`` random float64), 50.4 MB on disk, footer ``total_byte_size``
55.6 MB (expansion 1.10), 6 row groups. Each task shape ran in a fresh process
with numpy/pandas/pyarrow already imported; the figure is the peak RSS (VmHWM,
reset through ``/proc/self/clear_refs``) minus the RSS just before the task.
Inputs a task receives from other tasks were built inside the window. Keys were
normalised as :mod:`throttler.contract` does (path int64, Date int64 ns).
Sub-second runs vary; figures were stable within about 5% between two runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from throttler.errors import DataError
from throttler.plan import STRATEGIES, FileInfo

log = logging.getLogger(__name__)

MIB = 2**20

#: Slack added to every task: allocator pages kept after frees (pyarrow's
#: mimalloc pool, glibc arenas) and Dask's per-task bookkeeping. The measured
#: shapes exceeded their arithmetic (e.g. accumulators x 8 bytes) by up to 25 MiB.
TASK_OVERHEAD_BYTES = 32 * MIB

#: Decoded-per-on-disk bytes assumed when a file's footer is unknown. Measured
#: 1.10 on the simulation files (random float64 does not compress); 1.5 leaves room.
DEFAULT_EXPANSION = 1.5

#: A float64 accumulator (the aligned strategy's partial result).
ACCUMULATOR_BYTES_PER_ROW = 8

#: Aligned final task: decode one file's keys (2 x int64), sort permutation,
#: permuted keys and values, output table and Parquet writer buffers.
#: Measured 54 B/row when keys are already sorted, 69 B/row with a permutation.
ALIGNED_FINAL_BYTES_PER_ROW = 72

#: Sum leaf: a (path, Date)-indexed Series accumulator, the next file's Series
#: being built (factorising the keys is the peak) and the ``add`` result.
#: Measured 82 / 111 / 123 / 124 B/row streaming 1 / 3 / 6 / 9 files (it
#: levels off: files are streamed one at a time).
SUM_LEAF_BYTES_PER_ROW = 136

#: Sum combine, fixed part (the alignment hash tables and the result).
#: With :data:`PARTIAL_RESULT_BYTES_PER_ROW` per input, measured 101 / 146 /
#: 187 B/row for 2 / 4 / 8 inputs (119 / 205 counting the pickled input bytes).
SUM_COMBINE_BASE_BYTES_PER_ROW = 90

#: A Series/grouped result with a (path, Date) MultiIndex held between tasks:
#: values 8 + int32/int8 codes 5 = 13 B/row (``dask.sizeof`` 78.4 MB for 6M rows).
PARTIAL_RESULT_BYTES_PER_ROW = 16

#: Sum and groupby final task: index to columns, Arrow table, Parquet writer.
#: Measured 100 B/row.
FRAME_FINAL_BYTES_PER_ROW = 108

#: Groupby leaf, fixed part (the hash table and the grouped result).
#: Measured 160 / 215 / 340 / 562 B/row for 1 / 2 / 4 / 8 files per leaf.
GROUPBY_LEAF_BASE_BYTES_PER_ROW = 100

#: Groupby leaf, per file concatenated (decoded frame, its copy in the concat).
GROUPBY_FILE_BYTES_PER_ROW = 60

#: Groupby combine, fixed part. Measured 259 / 422 / 703 B/row for 2 / 4 / 8 inputs.
GROUPBY_COMBINE_BASE_BYTES_PER_ROW = 125

#: Groupby combine, per input concatenated.
GROUPBY_PARTIAL_BYTES_PER_ROW = 75

#: Bounds of the learned correction factor (multiplies every task estimate).
MIN_CORRECTION = 0.5
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
    return FileInfo(path=path, size_bytes=size_bytes, rows=md.num_rows, decoded_bytes=decoded)


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
    combine_bytes: int  #: 0 when the plan has a single leaf (no combine)
    final_bytes: int
    result_bytes: int  #: one partial result held between tasks

    @property
    def peak_bytes(self) -> int:
        """The largest task: what must fit one worker."""
        return max(self.leaf_bytes, self.combine_bytes, self.final_bytes)

    def scaled(self, factor: float) -> "TaskPeaks":
        return TaskPeaks(*(math.ceil(v * factor) for v in (
            self.leaf_bytes, self.combine_bytes, self.final_bytes, self.result_bytes)))


def raw_task_peaks(strategy: str, rows: int, file_decoded_bytes: int,
                   files_per_task: int, fan_in: int, n_leaves: int) -> TaskPeaks:
    """Uncorrected peaks of a plan's tasks; ``rows`` of the largest file.

    Assumes the files of a group share their keys (simulation outputs do): a
    partial result has about as many rows as one file.
    """
    if strategy == "aligned":
        peaks = _aligned_peaks(rows, file_decoded_bytes, fan_in)
    elif strategy == "sum":
        peaks = _sum_peaks(rows, fan_in)
    elif strategy == "groupby":
        peaks = _groupby_peaks(rows, files_per_task, fan_in)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return peaks if n_leaves > 1 else replace(peaks, combine_bytes=0)


def _aligned_peaks(rows: int, file_decoded_bytes: int, fan_in: int) -> TaskPeaks:
    # Leaf measured 104 MiB (18 B/row) for 1, 4 or 9 files read a row group at a
    # time; reading whole value columns instead measured 218-278 MiB.
    # Combine measured exactly (fan_in + 1) x 8 B/row (412 MiB for 8 inputs).
    acc = rows * ACCUMULATOR_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=acc + file_decoded_bytes + TASK_OVERHEAD_BYTES,
        combine_bytes=(fan_in + 1) * acc + TASK_OVERHEAD_BYTES,
        final_bytes=rows * ALIGNED_FINAL_BYTES_PER_ROW + TASK_OVERHEAD_BYTES,
        result_bytes=acc,
    )


def _sum_peaks(rows: int, fan_in: int) -> TaskPeaks:
    combine_per_row = SUM_COMBINE_BASE_BYTES_PER_ROW + fan_in * PARTIAL_RESULT_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=rows * SUM_LEAF_BYTES_PER_ROW + TASK_OVERHEAD_BYTES,
        combine_bytes=rows * combine_per_row + TASK_OVERHEAD_BYTES,
        final_bytes=rows * FRAME_FINAL_BYTES_PER_ROW + TASK_OVERHEAD_BYTES,
        result_bytes=rows * PARTIAL_RESULT_BYTES_PER_ROW,
    )


def _groupby_peaks(rows: int, files_per_task: int, fan_in: int) -> TaskPeaks:
    leaf_per_row = GROUPBY_LEAF_BASE_BYTES_PER_ROW + files_per_task * GROUPBY_FILE_BYTES_PER_ROW
    combine_per_row = GROUPBY_COMBINE_BASE_BYTES_PER_ROW + fan_in * GROUPBY_PARTIAL_BYTES_PER_ROW
    return TaskPeaks(
        leaf_bytes=rows * leaf_per_row + TASK_OVERHEAD_BYTES,
        combine_bytes=rows * combine_per_row + TASK_OVERHEAD_BYTES,
        final_bytes=rows * FRAME_FINAL_BYTES_PER_ROW + TASK_OVERHEAD_BYTES,
        result_bytes=rows * PARTIAL_RESULT_BYTES_PER_ROW,
    )


def group_peak_bytes(task_peak_bytes: int, result_bytes: int, n_leaves: int,
                     concurrent_leaves: int, fan_in: int) -> int:
    """The most one group holds across the cluster at once.

    At most ``concurrent_leaves`` tasks run at once, each at most the task
    peak; besides them, finished partial results wait for their combine. Dask
    orders a reduction depth first (a ready combine outranks new leaves), so
    at most ``concurrent_leaves x fan_in`` results wait, and never more than
    there are leaves.
    """
    running = max(1, min(n_leaves, concurrent_leaves))
    waiting = min(n_leaves, running * max(2, fan_in)) if n_leaves > 1 else 0
    return running * task_peak_bytes + waiting * result_bytes


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


def updated_stats(stats: StrategyStats, predicted_bytes: int, observed_bytes: int) -> StrategyStats:
    """Fold one observation in.

    ``predicted_bytes`` is the plan's estimate, which already included the
    correction in force; the correction that would have predicted exactly is
    therefore ``correction x observed / predicted``, and the factor moves
    toward it, fast upward and slowly downward.
    """
    ratio = observed_bytes / predicted_bytes
    target = clamp_correction(stats.correction * ratio)
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
    """Parse the persisted state; unknown or malformed entries fall back to defaults."""
    table = data.get("strategies", {}) if isinstance(data, dict) else {}
    out = {}
    for strategy in STRATEGIES:
        entry = table.get(strategy) if isinstance(table, dict) else None
        try:
            stats = StrategyStats(**entry) if entry else StrategyStats()
            out[strategy] = replace(stats, correction=clamp_correction(float(stats.correction)))
        except (TypeError, ValueError):
            log.warning("estimator state: ignoring malformed entry for %s: %r", strategy, entry)
            out[strategy] = StrategyStats()
    return out


def stats_to_json(stats: dict[str, StrategyStats]) -> dict:
    return {"version": STATE_VERSION, "strategies": {k: asdict(v) for k, v in stats.items()}}


# --------------------------------------------------------------------------- the estimator


class Estimator:
    """Prices plans with the strategy model times a learned per-strategy correction.

    Thread-safe: a lock guards the in-memory table only; the JSON file is
    written outside it (a second lock keeps writes in order). With a
    ``state_path``, corrections are loaded at start and saved after each
    observation; a failed save is logged, never raised.
    """

    def __init__(self, state_path: str | os.PathLike | None = None):
        self.state_path = os.fspath(state_path) if state_path is not None else None
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
        rows = max(rows_of(f) for f in files)
        decoded = max(decoded_bytes_of(f) for f in files)
        raw = raw_task_peaks(strategy, rows, decoded, files_per_task, fan_in, n_leaves)
        return raw.scaled(self.correction(strategy) * safety)

    def observe(self, strategy: str, predicted_task_peak_bytes: int, observed_peak_bytes: int) -> float:
        """Learn from one task's observed peak; returns the new correction.

        Non-positive figures (nothing measured) are ignored.
        """
        _check_strategy(strategy)
        if predicted_task_peak_bytes <= 0 or observed_peak_bytes <= 0:
            log.debug("estimator: ignoring observation %s %s/%s", strategy,
                      observed_peak_bytes, predicted_task_peak_bytes)
            return self.correction(strategy)
        with self._lock:
            stats = updated_stats(self._stats[strategy], predicted_task_peak_bytes, observed_peak_bytes)
            self._stats[strategy] = stats
        if self.state_path:
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

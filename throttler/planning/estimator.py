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
function of :mod:`throttler.worker.kernels` ran in a fresh process with numpy,
pandas and pyarrow imported; the figure is the peak RSS (VmHWM, reset through
``/proc/self/clear_refs``) minus the RSS just before the task, which is what
Dask's memory thresholds see. Combine and final inputs (pickled leaf results)
were loaded inside the window. Repeated runs agreed within a few percent
except where noted. "B/row" is bytes per row of one file.

Assumption: the files of a group share their keys (simulation outputs do), so
a partial result has about as many rows as one file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

from throttler.durable import write_json_atomic
from throttler.planning.memory_model import TaskPeaks, largest_file, raw_task_peaks
from throttler.planning.plan import STRATEGIES, FileInfo

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- strategy model


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

        ``factor_used`` is the plan's :attr:`~throttler.planning.plan.Plan.estimate_factor`
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



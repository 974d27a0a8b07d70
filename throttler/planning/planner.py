"""The planner: how to chunk one group so every task fits a worker and the group fits the cluster.

Pure: it reads footers already collected in :class:`~throttler.planning.plan.FileInfo`,
the cluster's :class:`~throttler.cluster.snapshot.ClusterShape` and the estimator's
prices, and returns a :class:`~throttler.planning.plan.Plan`.

Chunking rules:

* every task's peak fits the per-task budget: the largest worker's
  ``memory_limit x memory_fraction``, less what the worker process itself
  holds. Groupby leaves shrink their files per task until they fit, combines
  shrink their fan-in; if even the smallest task cannot fit,
  :class:`~throttler.errors.DoesNotFit`;
* about one leaf per cluster thread (more leaves than threads buys no
  parallelism), never more leaves than files, and fewer when the group peak
  would exceed the cluster budget (every worker's budget together). The
  aligned and sum leaves stream their files one at a time, so reading more
  files per leaf costs time, not memory;
* a re-plan after a worker died (``attempt > 1``) multiplies the estimates by
  1.5 per attempt and halves the fan-in (and groupby's files per task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from throttler.cluster.snapshot import ClusterShape
from throttler.config import DEFAULTS
from throttler.errors import CatalogError, DoesNotFit, NoWorkers, RequestError
from throttler.planning.estimator import Estimator
from throttler.planning.memory_model import (
    TaskPeaks,
    expansion,
    grid_cells,
    group_peak_parts,
    largest_file,
    raw_task_peaks,
)
from throttler.planning.plan import STRATEGY_CHOICES, FileInfo, Plan
from throttler.units import format_bytes
from throttler.worker.dense import MAX_GRID_CELLS

#: Estimates are multiplied by this once per attempt after the first.
ATTEMPT_SAFETY_FACTOR = 1.5

#: Default and smallest number of partial results one combine task adds
#: (the defaults' one value is in throttler.config).
DEFAULT_FAN_IN = DEFAULTS.fan_in
MIN_FAN_IN = 2

DEFAULT_MEMORY_FRACTION = DEFAULTS.memory_fraction

#: Fewest files a leaf reads when a group has files to spare, so a task's work
#: (aligned about 0.09 s a file, sum about 0.25-0.45 s) dwarfs the scheduler's
#: cost per task (1-2.5 ms) even for an estate of many small groups: at the
#: seed's scale one leaf per file would make the scheduler the bottleneck.
MIN_FILES_PER_LEAF = {"aligned": 8, "sum": 2, "groupby": 1, "dense": 8}

#: Sparse keys: ``auto`` takes the hash-based ``sum`` instead of ``dense`` when the
#: estimated grid (path range x distinct dates, from the footers) has more than this
#: many cells per input row of the group (the group's rows bound its distinct keys),
#: or more than :data:`throttler.dense.MAX_GRID_CELLS` cells at all (1.1 GiB of leaf
#: accumulator). benchmarks/sparse.py (2 shuffled files of 1.8M rows, path IDs spread
#: out) measured dense 2.3x / 2.6x / 2.0x / 1.3x / 1.1x faster than sum at 1 / 4 / 8 /
#: 16 / 32 cells per row, with a peak RSS of 358 / 425 / 568 / 840 / 1,377 MiB
#: against sum's 485-491 MiB: past about 8 cells per row dense saves little time and
#: costs more memory than sum.
SPARSE_CELLS_PER_ROW = 8

#: ``auto`` on a group whose footers all report the same row count: True keeps
#: ``aligned`` (falling back to ``dense`` on MisalignedKeys), False takes ``dense``.
#: On 10 aligned 6M-row files through a LocalCluster, output written, ``dense`` took
#: 0.65 s against ``aligned``'s 0.40 s (medians of 5, benchmarks/aggregate.py): not
#: within a few percent, so aligned groups keep ``aligned``.
AUTO_PREFERS_ALIGNED = True


@dataclass(frozen=True)
class _Pricing:
    """Prices task shapes of one group for one strategy and attempt.

    The largest file and the correction are read once: one plan prices many
    layouts of groups of up to 18,000 files.
    """

    strategy: str
    n_files: int
    largest: FileInfo
    safety: float  #: the attempt's factor
    factor: float  #: safety x the estimator's correction
    floor_bytes: int = 0  #: this group's own task, measured when it killed a worker (0: none)

    @classmethod
    def of(cls, strategy: str, files: list[FileInfo], estimator: Estimator, safety: float,
           floor_bytes: int = 0) -> "_Pricing":
        return cls(strategy, len(files), largest_file(files), safety,
                   safety * estimator.correction(strategy), floor_bytes)

    def peaks(self, files_per_task: int, fan_in: int, n_leaves: int) -> TaskPeaks:
        raw = raw_task_peaks(self.strategy, self.largest, files_per_task, fan_in, n_leaves)
        peaks = raw.scaled(self.factor)
        if self.floor_bytes > peaks.peak_bytes:  # measured beats modelled: every task scales up to it
            peaks = peaks.scaled(self.floor_bytes / peaks.peak_bytes)
        return peaks


@dataclass(frozen=True)
class _Layout:
    files_per_task: int
    n_leaves: int
    peaks: TaskPeaks
    group_peak_bytes: int
    running_bytes: int  #: the part of the group peak held by running tasks


def make_plan(group: str, files: list[FileInfo], strategy: str, shape: ClusterShape,
              estimator: Estimator, *, attempt: int = 1,
              memory_fraction: float = DEFAULT_MEMORY_FRACTION,
              max_files_per_task: int | None = None, fan_in: int = DEFAULT_FAN_IN,
              measured_task_peak_bytes: int = 0) -> Plan:
    """Plan ``group`` for ``shape``.

    Raises DoesNotFit when even the smallest layout (one file per groupby
    leaf, fan-in 2) has a task larger than what the largest worker allows one
    task running alone, CatalogError for an empty group and RequestError for an
    unknown strategy. ``measured_task_peak_bytes``: what this group's own task
    was measured at when it killed a worker (a floor for its estimates).
    """
    _validate(group, files, strategy, shape, attempt)
    resolved, notes = resolve_strategy(strategy, files)
    safety = ATTEMPT_SAFETY_FACTOR ** (attempt - 1)
    if attempt > 1:
        notes.append(f"attempt {attempt}: estimates x{safety:.2f}, smaller chunks")
    pricing = _Pricing.of(resolved, files, estimator, safety, measured_task_peak_bytes)
    budget = shape.task_budget_bytes(memory_fraction)
    fan_in = _fitting_fan_in(pricing, budget, max(MIN_FAN_IN, fan_in >> (attempt - 1)), notes)
    limit = _files_per_task_limit(pricing, budget, fan_in, attempt, max_files_per_task,
                                  shape.total_threads)
    layout, alone = _choose_layout(group, pricing, shape, memory_fraction, fan_in, limit, notes)
    return Plan(
        group=group, strategy=resolved, files=tuple(files),
        files_per_task=layout.files_per_task, fan_in=fan_in,
        task_peak_bytes=layout.peaks.peak_bytes, group_peak_bytes=layout.group_peak_bytes,
        running_bytes=layout.running_bytes,
        expansion=expansion(files), requested_strategy=strategy, attempt=attempt,
        estimate_factor=pricing.factor, run_alone=alone,
        notes=tuple(notes),
    )


def replan_after_oom(plan: Plan, shape: ClusterShape, estimator: Estimator, *,
                     memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> Plan:
    """Plan again after a worker died running ``plan``: next attempt, same strategy.

    The resolved strategy is kept (a group that fell back to ``sum`` stays
    there); the fan-in restarts from what the first attempt would have used.
    """
    first_fan_in = plan.fan_in << (plan.attempt - 1)
    new = make_plan(plan.group, list(plan.files), plan.strategy, shape, estimator,
                    attempt=plan.attempt + 1, memory_fraction=memory_fraction, fan_in=first_fan_in)
    return replace(new, requested_strategy=plan.requested_strategy)


def resolve_strategy(strategy: str, files: list[FileInfo]) -> tuple[str, list[str]]:
    """Turn ``auto`` into a concrete strategy; returns it with a note saying why.

    ``auto`` picks ``aligned`` when no footer proves a file's keys differ from
    the first file's (:meth:`FileInfo.may_share_keys`: the row count, and the
    row groups' path ranges where their sizes match; with
    :data:`AUTO_PREFERS_ALIGNED`; the runtime still checks the keys and falls
    back on MisalignedKeys, see :func:`fallback_strategy`), else ``dense``
    when the footers show a dense enough key grid, else ``sum``. Going to
    ``dense`` at once for a shuffled file whose row count matches saves the
    ``aligned`` attempt that would fail on it; a file re-encoded with the same
    keys (the previous output of an incremental run) keeps ``aligned``.
    """
    if strategy != "auto":
        return strategy, []
    if AUTO_PREFERS_ALIGNED and files and all(f.may_share_keys(files[0]) for f in files):
        return "aligned", ["auto -> aligned: no footer shows keys other than the first file's"]
    suits, why = dense_suits(files)
    return ("dense", [f"auto -> dense: {why}"]) if suits else ("sum", [f"auto -> sum: {why}"])


def dense_suits(files: list[FileInfo]) -> tuple[bool, str]:
    """Whether the footers show a key grid dense enough for ``dense`` (pure; with the reason)."""
    if any(f.path_min is None or f.path_max is None or f.date_count <= 0 or f.rows <= 0 for f in files):
        return False, "footers without path statistics, Date dictionary or row count"
    cells = grid_cells(largest_file(files))
    rows = sum(f.rows for f in files)
    if cells > MAX_GRID_CELLS:
        return False, f"sparse keys: a grid of {cells:,} cells exceeds {MAX_GRID_CELLS:,}"
    if cells > SPARSE_CELLS_PER_ROW * rows:
        return False, f"sparse keys: {cells:,} grid cells for {rows:,} rows (> {SPARSE_CELLS_PER_ROW} per row)"
    return True, f"{cells:,} grid cells for {rows:,} rows"


def fallback_strategy(failed: str, files: list[FileInfo]) -> str:
    """What ``auto`` runs after ``failed`` found keys it cannot handle (MisalignedKeys):
    ``aligned`` falls back to ``dense`` when the grid suits, anything else to ``sum``."""
    return "dense" if failed == "aligned" and dense_suits(files)[0] else "sum"


def _validate(group: str, files: list[FileInfo], strategy: str, shape: ClusterShape, attempt: int) -> None:
    if not files:
        raise CatalogError(f"group {group}: no files")
    if strategy not in STRATEGY_CHOICES:
        raise RequestError(f"group {group}: unknown strategy {strategy!r}; expected one of {STRATEGY_CHOICES}")
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if shape.n_workers == 0:
        raise NoWorkers("cannot plan for a cluster without workers; wait for workers first")


def _fitting_fan_in(pricing: _Pricing, budget: int, fan_in: int, notes: list[str]) -> int:
    """The largest fan-in up to ``fan_in`` whose combine and final tasks fit the budget."""
    start = fan_in
    while fan_in > MIN_FAN_IN and _widest_merge_bytes(pricing, fan_in) > budget:
        fan_in -= 1
    if fan_in < start:
        notes.append(f"fan-in {start} -> {fan_in}: a wider combine exceeds {format_bytes(budget)}")
    return fan_in


def _widest_merge_bytes(pricing: _Pricing, fan_in: int) -> int:
    peaks = pricing.peaks(1, fan_in, fan_in + 1)  # one more leaf than fan-in: a full combine
    return max(peaks.combine_bytes, peaks.final_bytes)


def _files_per_task_limit(pricing: _Pricing, budget: int, fan_in: int, attempt: int,
                          max_files_per_task: int | None, threads: int) -> int:
    """Most files one leaf may read: any number when streaming, else what fits.

    A groupby leaf grows with its files; it must fit the budget together with the
    ``fan_in`` finished partials that may wait on its worker for their merge (no
    resource holds them: docs/memory.md). A groupby re-plan halves, per attempt,
    what the first attempt would read.
    """
    n = pricing.n_files
    limit = n if max_files_per_task is None else max(1, min(n, max_files_per_task))
    if pricing.strategy != "groupby":
        return limit
    fitting = 1
    while fitting < limit and _leaf_with_waiting_bytes(pricing, fitting + 1, fan_in) <= budget:
        fitting += 1
    first_attempt = min(fitting, math.ceil(n / min(n, max(1, threads))))
    return max(1, first_attempt >> (attempt - 1))


def _leaf_with_waiting_bytes(pricing: _Pricing, files_per_task: int, fan_in: int) -> int:
    peaks = pricing.peaks(files_per_task, fan_in, 2)
    return peaks.leaf_bytes + fan_in * peaks.result_bytes


def _choose_layout(group: str, pricing: _Pricing, shape: ClusterShape, memory_fraction: float,
                   fan_in: int, limit: int, notes: list[str]) -> tuple[_Layout, bool]:
    """(layout, run alone): about one leaf per thread, fewer while the group exceeds the cluster budget.

    A layout's largest task should fit what a worker shares among our tasks;
    if none does, it runs alone on its worker, up to that worker's solo budget.
    Raises DoesNotFit when no layout fits even alone.
    """
    n, threads = pricing.n_files, max(1, shape.total_threads)
    cluster_budget = shape.cluster_budget_bytes(memory_fraction)
    most_leaves = min(n, threads, math.ceil(n / MIN_FILES_PER_LEAF[pricing.strategy]))
    layouts = [_layout(pricing, shape, n, target, limit, fan_in, memory_fraction)
               for target in range(most_leaves, 0, -1)]
    shared = _fitting(layouts, pricing, shape, most_leaves, limit, fan_in, memory_fraction,
                      shape.task_budget_bytes(memory_fraction), notes)
    fitting, alone = shared, False
    if not shared:
        solo = shape.solo_task_budget_bytes()
        fitting = _fitting(layouts, pricing, shape, most_leaves, limit, fan_in, memory_fraction, solo, notes)
        alone = bool(fitting)
        if alone:
            notes.append(f"largest task above what a worker shares: each runs alone on its worker "
                         f"(up to {format_bytes(solo)})")
    if not fitting:
        bare = replace(pricing, factor=1.0)  # what is refused is the bare model, or the measured floor
        _raise_does_not_fit(group, bare, shape, min((_layout(bare, shape, n, t, limit, fan_in, memory_fraction)
                                                     for t in range(most_leaves, 0, -1)), key=_peak))
    for layout in fitting:
        if layout.group_peak_bytes <= cluster_budget:
            return layout, alone
    smallest = min(fitting, key=lambda lay: lay.group_peak_bytes)
    notes.append(f"group peak {format_bytes(smallest.group_peak_bytes)} exceeds the cluster budget "
                 f"{format_bytes(cluster_budget)}: it runs alone")
    return smallest, alone


def _fitting(layouts: list[_Layout], pricing: _Pricing, shape: ClusterShape, most_leaves: int, limit: int,
             fan_in: int, memory_fraction: float, budget: int, notes: list[str]) -> list[_Layout]:
    """The layouts whose largest task fits ``budget``, with corrections capped if that is what it takes."""
    fitting = [lay for lay in layouts if lay.peaks.peak_bytes <= budget]
    if fitting:
        return fitting
    return _with_capped_correction(pricing, shape, pricing.n_files, most_leaves, limit, fan_in, budget,
                                   memory_fraction, notes)


def _with_capped_correction(pricing: _Pricing, shape: ClusterShape, n: int, most_leaves: int, limit: int,
                            fan_in: int, task_budget: int, memory_fraction: float,
                            notes: list[str]) -> list[_Layout]:
    """Layouts that fit once the corrections (learned, and the retry safety) are capped.

    A correction may make a group wait or run alone, never fail it: only the
    bare model, or this group's own measured peak (the floor), can. Empty when
    even the bare model (with the floor) does not fit.
    """
    if pricing.factor <= 1.0:
        return []
    bare = replace(pricing, factor=1.0)
    smallest = min((_layout(bare, shape, n, t, limit, fan_in, memory_fraction)
                    for t in range(most_leaves, 0, -1)), key=_peak)
    if smallest.peaks.peak_bytes > task_budget:
        return []
    capped = replace(pricing, factor=max(1.0, 0.999 * task_budget / smallest.peaks.peak_bytes))
    layouts = [_layout(capped, shape, n, t, limit, fan_in, memory_fraction) for t in range(most_leaves, 0, -1)]
    notes.append(f"estimate x{pricing.factor:.2f} exceeds {format_bytes(task_budget)}; corrections capped "
                 f"(x{capped.factor:.2f})")
    return [lay for lay in layouts if lay.peaks.peak_bytes <= task_budget]


def _peak(layout: _Layout) -> int:
    return layout.peaks.peak_bytes


def _layout(pricing: _Pricing, shape: ClusterShape, n_files: int, target_leaves: int,
            limit: int, fan_in: int, memory_fraction: float) -> _Layout:
    files_per_task = min(limit, math.ceil(n_files / target_leaves))
    n_leaves = math.ceil(n_files / files_per_task)
    peaks = pricing.peaks(files_per_task, fan_in, n_leaves)
    running, waiting = group_peak_parts(peaks, n_leaves, shape.concurrent_tasks(peaks.peak_bytes, memory_fraction),
                                        fan_in)
    return _Layout(files_per_task, n_leaves, peaks, running + waiting, running)


def _raise_does_not_fit(group: str, pricing: _Pricing, shape: ClusterShape, smallest: _Layout) -> None:
    peaks = smallest.peaks
    shapes = {"leaf": peaks.leaf_bytes, "combine": peaks.combine_bytes, "final": peaks.final_bytes}
    measured = pricing.floor_bytes >= 0.999 * peaks.peak_bytes  # the floor set every task's peak (to rounding)
    worst = "heaviest" if measured else max(shapes, key=shapes.get)
    limit = shape.largest_memory_limit_bytes
    files = "1 file" if smallest.files_per_task == 1 else f"{smallest.files_per_task} files"
    why = (f"measured at {format_bytes(pricing.floor_bytes)} when it killed a worker"
           if measured else "the bare model's estimate")
    raise DoesNotFit(
        f"group {group}: the smallest {pricing.strategy} plan ({files} per leaf) has a {worst} task "
        f"of about {format_bytes(peaks.peak_bytes)} ({why}), but the largest worker allows "
        f"{format_bytes(shape.solo_task_budget_bytes())} for one task running alone (memory_limit "
        f"{format_bytes(limit)}, below Dask's pause threshold, less what the worker itself holds)"
        + ("; the workers declare no memory_limit" if limit == 0 else ""))

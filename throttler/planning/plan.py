"""The plan of one group: what to read, how to chunk it, and what it costs in memory.

A plan is a plain value. It is made by :mod:`throttler.planning.planner`, priced by
:mod:`throttler.planning.estimator`, judged by :mod:`throttler.admission.policy` and turned into a
Dask graph by :mod:`throttler.worker.graphs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("aligned", "sum", "groupby", "dense")
STRATEGY_CHOICES = ("auto",) + STRATEGIES


@dataclass(frozen=True)
class FileInfo:
    """One input file as the planner saw it."""

    path: str  #: absolute path, already checked to lie under the data root
    size_bytes: int  #: on-disk size
    rows: int = 0  #: rows from the Parquet footer (0 when unknown)
    decoded_bytes: int = 0  #: uncompressed size from the Parquet footer (0 when unknown)
    path_min: int | None = None  #: smallest ``path`` from the footer's statistics (None when unknown)
    path_max: int | None = None  #: largest ``path`` from the footer's statistics (None when unknown)
    date_count: int = 0  #: distinct dates of the first row group (its dictionary page's size; 0 unknown)
    #: each row group's (rows, smallest ``path``, largest ``path``), from the footer (() unknown)
    row_group_paths: tuple[tuple[int, int, int], ...] = ()

    def may_share_keys(self, other: "FileInfo") -> bool:
        """False when the footers prove the two files' keys differ in content or order; True says
        only that they may be the same.

        Proof: other row counts, or row groups of the same sizes whose ``path`` ranges differ (the
        same keys in the same order would give the same ranges; a shuffled file's row groups each
        span the whole path range, a sorted one's a slice of it). Row groups of other sizes (another
        writer, an output rewritten) prove nothing.
        """
        if self.rows != other.rows or not self.rows:
            return False
        mine, theirs = self.row_group_paths, other.row_group_paths
        if not (mine and theirs) or [g[0] for g in mine] != [g[0] for g in theirs]:
            return True
        return mine == theirs


@dataclass(frozen=True)
class Plan:
    """How one group is computed, and its memory price.

    ``task_peak_bytes`` is the peak of the largest single task (it must fit one
    worker); ``group_peak_bytes`` is the most the whole group can hold at once
    across the cluster (what admission reserves).
    """

    group: str
    strategy: str  #: one of STRATEGIES (never "auto": the planner resolves it)
    files: tuple[FileInfo, ...]
    files_per_task: int  #: files read by one leaf task
    fan_in: int  #: how many partial results one combine task adds
    task_peak_bytes: int
    group_peak_bytes: int
    expansion: float  #: decoded bytes per on-disk byte used for the estimate
    requested_strategy: str = "auto"
    running_bytes: int = 0  #: the part of group_peak_bytes held by running tasks (0: not split)
    estimate_factor: float = 1.0  #: the estimator's correction x retry safety the estimates include
    attempt: int = 1
    run_alone: bool = False  #: its largest task exceeds what a worker shares: each task runs alone on its worker
    notes: tuple[str, ...] = field(default=())

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def input_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def n_leaf_tasks(self) -> int:
        return -(-self.n_files // max(1, self.files_per_task))



def merge_levels(n_leaves: int, fan_in: int) -> list[int]:
    """The number of combine tasks of each level of a group's tree, from the leaves up.

    The one statement of the tree's shape: combine tasks add ``fan_in``
    consecutive partials of the level below (the last one what is left) until
    at most ``fan_in`` remain, which the final task (not counted) adds. No
    level when ``n_leaves <= fan_in``. A ``fan_in`` below 2 counts as 2.
    """
    fan_in = max(2, fan_in)
    levels: list[int] = []
    width = n_leaves
    while width > fan_in:
        width = -(-width // fan_in)
        levels.append(width)
    return levels


def merge_tree(n_leaves: int, fan_in: int) -> list[list[int]]:
    """The inputs of each combine task of :func:`merge_levels`, level by level."""
    fan_in = max(2, fan_in)
    tree, below = [], n_leaves
    for tasks in merge_levels(n_leaves, fan_in):
        tree.append([fan_in] * (tasks - 1) + [below - fan_in * (tasks - 1)])
        below = tasks
    return tree

"""Graph builders: a plan becomes a Dask graph of leaf, combine and final tasks.

Three strategies share one tree shape (see :mod:`throttler.worker.kernels`):

* ``aligned`` streams ``value`` columns into float64 accumulators (the fast path);
* ``sum`` folds (path, Date)-indexed pandas Series: index-aligned summation;
* ``groupby`` concatenates a chunk of files and groups it, the seed's first way;
* ``dense`` scatter-adds into a (path x Date) grid of the keys' domain
  (see :mod:`throttler.dense`): keys in any order, no sort, no hash table.

A group that fits one leaf runs as one task (leaf and final in turn), so the
common small group costs one scheduled task and moves no partial result
between workers.

Keys carry a per-submission token: Dask applies resource restrictions only to
keys it has not seen, so a resubmitted group must never reuse old keys.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import dask
from dask.delayed import Delayed

from throttler.planning.plan import Plan, merge_tree
from throttler.worker import dense, dense_merge, kernels
from throttler.worker.peakrss import Measured


@dataclass(frozen=True)
class GroupGraph:
    """The built graph of one submission of one group."""

    final: Delayed  #: computes to the summary dict
    token: str  #: unique per submission; every key of the graph contains it
    n_tasks: int
    key_prefix: str


def new_token() -> str:
    return uuid.uuid4().hex[:16]


def build(plan: Plan, output_path: str, token: str | None = None) -> GroupGraph:
    """Build the graph of ``plan`` writing ``output_path``."""
    token = token or new_token()
    prefix = f"throttler-{plan.strategy}-{token}"
    files = [f.path for f in plan.files]
    leaf_fn, combine_fn, final_fn, extra = _functions(plan.strategy, files)
    chunks = [files[i:i + plan.files_per_task] for i in range(0, len(files), plan.files_per_task)]
    if plan.strategy == "dense":
        chunks = dense_chunks(plan, [len(c) for c in chunks])
    if len(chunks) == 1:  # one task reads and writes: no partial result to hold, move or schedule
        final = _task(kernels.single_task, f"{prefix}-final", leaf_fn, final_fn, files, extra, output_path)
        return GroupGraph(final, token, 1, prefix)
    level = [_task(leaf_fn, f"{prefix}-leaf-{i}", chunk, *extra) for i, chunk in enumerate(chunks)]
    n_tasks = len(level)
    for depth, inputs in enumerate(merge_tree(len(level), plan.fan_in), start=1):
        level = _combine_level(combine_fn, f"{prefix}-combine-{depth}", level, inputs)
        n_tasks += len(level)
    final = _task(final_fn, f"{prefix}-final", level, *extra, output_path)
    return GroupGraph(final, token, n_tasks + 1, prefix)


def dense_chunks(plan: Plan, sizes: list[int]) -> list[list[str]]:
    """The files of ``dense`` leaves (of ``sizes`` files each), the likely-scattered ones spread evenly.

    A file whose footer proves its keys differ from the first file's (row
    count, row groups' path ranges) takes the scatter-add (about 2.5x
    the cost of an aligned file's add). Dealt out first, one leaf at a time,
    such files are shared among the leaves instead of all landing in the last:
    with 8 aligned files and 2 that are not, each of 2 leaves gets one (a
    leaf's time is the group's time).
    """
    likely_aligned = [f.may_share_keys(plan.files[0]) for f in plan.files]
    ordered = [f.path for f, a in zip(plan.files, likely_aligned) if not a]
    ordered += [f.path for f, a in zip(plan.files, likely_aligned) if a]
    chunks: list[list[str]] = [[] for _ in sizes]
    leaf = 0
    for path in ordered:
        while len(chunks[leaf]) == sizes[leaf]:
            leaf = (leaf + 1) % len(sizes)
        chunks[leaf].append(path)
        leaf = (leaf + 1) % len(sizes)
    return chunks


def _combine_level(combine_fn, prefix: str, below: list[Delayed], inputs: list[int]) -> list[Delayed]:
    """One level of combine tasks: task ``i`` adds the next ``inputs[i]`` tasks of ``below``."""
    level, start = [], 0
    for i, n in enumerate(inputs):
        level.append(_task(combine_fn, f"{prefix}-{i}", below[start:start + n]))
        start += n
    return level


def _functions(strategy: str, files: list[str]):
    if strategy == "dense":
        return dense.dense_leaf, dense_merge.dense_combine, dense_merge.dense_final, (files[0],)
    if strategy == "aligned":
        return kernels.aligned_leaf, kernels.aligned_combine, kernels.aligned_final, (files[0],)
    if strategy == "sum":
        return kernels.sum_leaf, kernels.sum_combine, kernels.sum_final, ()
    if strategy == "groupby":
        return kernels.groupby_leaf, kernels.groupby_combine, kernels.groupby_final, ()
    raise ValueError(f"unknown strategy {strategy!r}")


def _task(fn, key: str, *args) -> Delayed:
    """One task of the graph; it also measures its worker's peak RSS (:mod:`throttler.worker.peakrss`)."""
    return dask.delayed(Measured(fn), pure=False)(*args, dask_key_name=key)

"""The group's tree shape: planning.plan.merge_levels / merge_tree, and the graph graphs.build makes of it."""

import pytest

from throttler.planning.memory_model import merge_task_count
from throttler.planning.plan import FileInfo, Plan, merge_levels, merge_tree
from throttler.worker import graphs


@pytest.mark.parametrize("n_leaves, fan_in, levels, tree", [
    (0, 8, [], []),
    (1, 8, [], []),
    (8, 8, [], []),
    (9, 8, [2], [[8, 1]]),
    (17, 8, [3], [[8, 8, 1]]),
    (64, 8, [8], [[8] * 8]),
    (65, 8, [9, 2], [[8] * 8 + [1], [8, 1]]),
    (200, 8, [25, 4], [[8] * 25, [8, 8, 8, 1]]),
    (5, 2, [3, 2], [[2, 2, 1], [2, 1]]),
    (5, 1, [3, 2], [[2, 2, 1], [2, 1]]),  # a fan-in below 2 counts as 2
])
def test_merge_levels_and_tree(n_leaves, fan_in, levels, tree):
    assert merge_levels(n_leaves, fan_in) == levels
    assert merge_tree(n_leaves, fan_in) == tree
    assert merge_task_count(n_leaves, fan_in) == 1 + sum(levels)


def _plan(n_files: int, files_per_task: int, fan_in: int) -> Plan:
    files = tuple(FileInfo(f"/data/f{i}.parquet", size_bytes=1000, rows=10, decoded_bytes=1000) for i in range(n_files))
    return Plan("g", "sum", files, files_per_task, fan_in, task_peak_bytes=1, group_peak_bytes=1, expansion=1.0)


@pytest.mark.parametrize("n_files, files_per_task, fan_in, combine_keys", [
    (3, 3, 8, []),  # one leaf: one fused task
    (24, 3, 8, []),  # eight leaves: the final adds them
    (27, 3, 4, ["combine-1-0", "combine-1-1", "combine-1-2"]),  # nine leaves, fan-in 4: 4 + 4 + 1
    (60, 2, 4, ["combine-1-0", "combine-1-1", "combine-1-2", "combine-1-3", "combine-1-4", "combine-1-5",
                "combine-1-6", "combine-1-7", "combine-2-0", "combine-2-1"]),  # 30 leaves: 8, then 2
])
def test_the_graph_has_the_tree_the_model_counts(n_files, files_per_task, fan_in, combine_keys):
    plan = _plan(n_files, files_per_task, fan_in)
    graph = graphs.build(plan, "/nonexistent/out.parquet", token="t")
    keys = {str(k) for k in graph.final.dask.keys()}
    prefix = "throttler-sum-t-"
    assert sorted(k[len(prefix):] for k in keys if "-combine-" in k) == combine_keys
    n_leaves = plan.n_leaf_tasks
    expected = 1 if n_leaves == 1 else n_leaves + merge_task_count(n_leaves, fan_in)
    assert graph.n_tasks == len(keys) == expected


@pytest.mark.parametrize("rows, sizes, chunks", [
    # 8 files like the first, 2 with other row counts (the last two): one of those per leaf
    ([10] * 8 + [11, 12], [5, 5], [[8, 0, 2, 4, 6], [9, 1, 3, 5, 7]]),
    ([10] * 7, [3, 3, 1], [[0, 3, 5], [1, 4, 6], [2]]),  # all alike: dealt in turn, full leaves passed over
    ([0] * 4, [2, 2], [[0, 2], [1, 3]]),  # row counts unknown: every file counts as not aligned
    ([10, 20, 30, 10], [3, 1], [[1, 0, 3], [2]]),  # the two unlike the first go to different leaves
])
def test_dense_leaves_share_the_files_that_cannot_be_aligned(rows, sizes, chunks):
    files = tuple(FileInfo(f"/data/f{i}.parquet", size_bytes=1000, rows=r) for i, r in enumerate(rows))
    plan = Plan("g", "dense", files, max(sizes), 8, task_peak_bytes=1, group_peak_bytes=1, expansion=1.0)
    assert graphs.dense_chunks(plan, sizes) == [[f"/data/f{i}.parquet" for i in chunk] for chunk in chunks]

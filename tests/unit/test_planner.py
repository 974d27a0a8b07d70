"""The planner: strategy resolution, chunking against worker and cluster budgets, re-plans."""

from __future__ import annotations

import dataclasses

import pytest

from throttler.cluster.snapshot import ClusterShape
from throttler.config import DEFAULTS
from throttler.errors import CatalogError, DoesNotFit, NoWorkers, RequestError
from throttler.planning.estimator import Estimator
from throttler.planning.memory_model import raw_task_peaks
from throttler.planning.plan import FileInfo
from throttler.planning.planner import (
    ATTEMPT_SAFETY_FACTOR,
    make_plan,
    replan_after_oom,
    resolve_strategy,
)

GiB = 2**30
MiB = 2**20
ROWS = 6_000_000


def files(n, rows=ROWS):
    return [FileInfo(f"/data/f{i}.parquet", size_bytes=50_390_300, rows=rows, decoded_bytes=55_553_687)
            for i in range(n)]


def budgets(shape, fraction=0.6):
    return shape.task_budget_bytes(fraction), shape.cluster_budget_bytes(fraction)


SMALL = ClusterShape.uniform(2, 4 * 10**9, nthreads=1)  # the seed's failing cluster


# --------------------------------------------------------------------------- strategy


def test_auto_picks_aligned_when_footers_agree_else_sum():
    assert resolve_strategy("auto", files(3))[0] == "aligned"
    mixed = files(2) + files(1, rows=5_000_000)
    assert resolve_strategy("auto", mixed)[0] == "sum"
    assert resolve_strategy("auto", files(2, rows=0))[0] == "sum"
    assert resolve_strategy("groupby", mixed) == ("groupby", [])


def test_plan_records_requested_and_resolved_strategy():
    p = make_plan("g", files(10), "auto", SMALL, Estimator())
    assert (p.strategy, p.requested_strategy, p.attempt) == ("aligned", "auto", 1)
    assert any("auto -> aligned" in n for n in p.notes)
    assert p.files == tuple(files(10))
    assert p.expansion == pytest.approx(1.10, abs=0.01)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("strategy", ["aligned", "sum", "groupby", "dense"])
@pytest.mark.parametrize("n", [1, 2, 10, 500])
def test_every_task_fits_the_largest_worker(strategy, n):
    p = make_plan("g", files(n), strategy, SMALL, Estimator())
    task_budget, cluster_budget = budgets(SMALL)
    assert p.task_peak_bytes <= task_budget
    assert p.group_peak_bytes <= cluster_budget or any("runs alone" in n for n in p.notes)
    assert 1 <= p.n_leaf_tasks <= n
    assert p.files_per_task * p.n_leaf_tasks >= n


def test_about_one_leaf_per_thread():
    shape = ClusterShape.uniform(4, 16 * GiB, nthreads=2)
    p = make_plan("g", files(100), "aligned", shape, Estimator())
    assert p.n_leaf_tasks == 8 and p.files_per_task == 13
    few = make_plan("g", files(20), "aligned", shape, Estimator())
    assert few.n_leaf_tasks == 3 and few.files_per_task == 7  # at least 8 files a leaf where possible
    assert make_plan("g", files(3), "aligned", shape, Estimator()).n_leaf_tasks == 1
    assert make_plan("g", files(3), "sum", shape, Estimator()).n_leaf_tasks == 2


def test_a_group_larger_than_the_cluster_gets_fewer_leaves_reading_more_files():
    # many threads, little memory
    shape = ClusterShape(2, (2 * GiB, 2 * GiB), (16, 16))
    p = make_plan("g", files(64), "sum", shape, Estimator())
    _, cluster_budget = budgets(shape)
    assert p.group_peak_bytes <= cluster_budget
    assert p.n_leaf_tasks < shape.total_threads
    assert p.files_per_task > 1
    assert p.n_leaf_tasks * p.files_per_task >= 64


def test_the_daemon_budgets_limit_concurrency_and_so_the_group_peak():
    narrow = ClusterShape(2, (2 * GiB, 2 * GiB), (16, 16), (600 * MiB, 600 * MiB), (1400 * MiB, 1400 * MiB))
    wide = ClusterShape(2, (2 * GiB, 2 * GiB), (16, 16), (1800 * MiB, 1800 * MiB), (1900 * MiB, 1900 * MiB))
    a = make_plan("g", files(64), "aligned", narrow, Estimator())
    b = make_plan("g", files(64), "aligned", wide, Estimator())
    assert narrow.concurrent_tasks(a.task_peak_bytes) < wide.concurrent_tasks(a.task_peak_bytes)
    assert a.running_bytes < b.running_bytes and not a.run_alone and not b.run_alone


def test_groupby_shrinks_files_per_task_until_the_leaf_and_its_waiting_partials_fit():
    p = make_plan("g", files(40), "groupby", SMALL, Estimator())
    budget = SMALL.task_budget_bytes(DEFAULTS.memory_fraction)

    def leaf_and_waiting(n):
        peaks = raw_task_peaks("groupby", files(1)[0], n, p.fan_in, 2)
        return peaks.leaf_bytes + p.fan_in * peaks.result_bytes

    assert leaf_and_waiting(p.files_per_task) <= budget < leaf_and_waiting(p.files_per_task + 1)
    # (24 + 4 x 56) B/row of 6M rows + 32 MiB, and 4 partials of 24 B/row: 2.10 GB; 5 files: 2.43 GB
    assert (p.files_per_task, p.fan_in, p.n_leaf_tasks) == (4, 4, 10)
    assert any("fan-in 8 -> 4" in n for n in p.notes)


def test_max_files_per_task_is_honoured():
    p = make_plan("g", files(100), "aligned", SMALL, Estimator(), max_files_per_task=10)
    assert p.files_per_task == 10 and p.n_leaf_tasks == 10


def test_does_not_fit_names_the_numbers():
    tiny = ClusterShape.uniform(2, 256 * MiB)
    with pytest.raises(DoesNotFit) as info:
        make_plan("big-group", files(2), "sum", tiny, Estimator())
    message = str(info.value)
    assert "big-group" in message and "MiB" in message
    assert "the largest worker allows 48.0 MiB for one task running alone (memory_limit 256.0 MiB" in message


def test_workers_without_memory_limit_cannot_be_planned_for():
    with pytest.raises(DoesNotFit, match="no memory_limit"):
        make_plan("g", files(2), "aligned", ClusterShape.uniform(2, 0), Estimator())


def test_bad_inputs():
    with pytest.raises(CatalogError):
        make_plan("g", [], "auto", SMALL, Estimator())
    with pytest.raises(RequestError):
        make_plan("g", files(2), "fastest", SMALL, Estimator())
    with pytest.raises(NoWorkers, match="without workers"):
        make_plan("g", files(2), "auto", ClusterShape(0, (), ()), Estimator())


def test_learned_correction_raises_the_estimate():
    e = Estimator()
    before = make_plan("g", files(10), "aligned", SMALL, e)
    e.observe("aligned", before.task_peak_bytes, 2 * before.task_peak_bytes)
    after = make_plan("g", files(10), "aligned", SMALL, e)
    assert after.task_peak_bytes > 1.5 * before.task_peak_bytes


# --------------------------------------------------------------------------- attempts


def test_later_attempts_estimate_more_and_chunk_smaller():
    big = ClusterShape.uniform(2, 64 * GiB, nthreads=1)
    first = make_plan("g", files(40), "groupby", big, Estimator())
    second = make_plan("g", files(40), "groupby", big, Estimator(), attempt=2)
    assert second.fan_in == first.fan_in // 2
    assert second.files_per_task < first.files_per_task
    same_shape = make_plan("g", files(40), "aligned", big, Estimator(), attempt=2)
    base = make_plan("g", files(40), "aligned", big, Estimator(), fan_in=4)
    assert same_shape.fan_in == 4
    assert same_shape.task_peak_bytes == pytest.approx(ATTEMPT_SAFETY_FACTOR * base.task_peak_bytes, rel=1e-6)


def test_replan_after_oom_keeps_the_strategy_and_bumps_the_attempt():
    e = Estimator()
    p = dataclasses.replace(make_plan("g", files(12), "sum", SMALL, e), requested_strategy="auto")
    again = replan_after_oom(p, SMALL, e)
    assert (again.strategy, again.requested_strategy, again.attempt) == ("sum", "auto", 2)
    assert again.task_peak_bytes > p.task_peak_bytes
    assert again.task_peak_bytes <= SMALL.task_budget_bytes(0.6)


def test_replan_on_a_shrunken_cluster_uses_fewer_leaves():
    wide = ClusterShape.uniform(8, 8 * GiB, nthreads=2)
    p = make_plan("g", files(64), "aligned", wide, Estimator())
    narrow = ClusterShape.uniform(1, 8 * GiB, nthreads=2)
    again = replan_after_oom(p, narrow, Estimator())
    assert again.n_leaf_tasks <= 2 < p.n_leaf_tasks


def test_replans_cap_their_safety_factor_a_measured_peak_above_every_worker_does_not_fit():
    e = Estimator()
    p = make_plan("g", files(10), "groupby", SMALL, e)
    for _ in range(10):  # retries are bounded by the outcome policy, never by a correction
        p = replan_after_oom(p, SMALL, e)
    assert p.attempt == 11 and p.task_peak_bytes <= SMALL.solo_task_budget_bytes()
    assert any("corrections capped" in n for n in p.notes), p.notes
    with pytest.raises(DoesNotFit, match=r"measured at .* when it killed a worker"):
        make_plan("g", files(10), "groupby", SMALL, e, measured_task_peak_bytes=SMALL.solo_task_budget_bytes() + 1)


def test_planning_a_huge_group_on_a_big_cluster():
    # how fast it plans is measured by benchmarks/daemon_costs.py, not asserted here
    shape = ClusterShape.uniform(500, 16 * GiB, nthreads=2)
    p = make_plan("g", files(18_000), "aligned", shape, Estimator())
    assert p.n_leaf_tasks == 1000 and p.files_per_task == 18

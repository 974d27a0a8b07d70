"""Worker peak RSS per task: the kernel's high-water mark, reset before and read after each task."""

from __future__ import annotations

import pickle

import numpy as np
import psutil
import pytest

from throttler.service import records
from throttler.worker import graphs, peakrss
from throttler.worker.kernels import Partial
from throttler.worker.peakrss import Measured, PeakReading

MiB = 2**20


def test_higher_reading_is_the_one_closer_to_its_limit():
    near = PeakReading(700 * MiB, 1000 * MiB)
    big_but_far = PeakReading(900 * MiB, 4000 * MiB)
    assert near.higher(big_but_far) is near and big_but_far.higher(near) is near
    assert PeakReading(5, 0).higher(PeakReading(9, 0)).rss_bytes == 9  # no limits: bytes decide
    assert PeakReading(9 * MiB, 0).higher(near) is near  # a known limit beats none
    assert PeakReading().fraction is None and near.fraction == 0.7


def test_rise_is_the_peak_above_the_start_and_goes_with_the_higher_reading():
    reading = PeakReading(700 * MiB, 1000 * MiB, 250 * MiB)
    assert reading.rise_bytes == 450 * MiB
    assert PeakReading(700 * MiB, 1000 * MiB).rise_bytes is None  # start not known
    assert PeakReading(100, 0, 300).rise_bytes == 0  # never negative
    lower = PeakReading(900 * MiB, 4000 * MiB, 100 * MiB)
    assert lower.higher(reading).rise_bytes == 450 * MiB  # the whole winning reading, its start too
    summary = {"worker_peak_rss_bytes": 700 * MiB, "worker_start_rss_bytes": 250 * MiB}
    assert records.worker_peak_rise_bytes(summary) == 450 * MiB  # what done/ records say
    assert records.worker_peak_rise_bytes({"worker_peak_rss_bytes": 700 * MiB}) is None


def test_a_start_read_a_few_pages_above_the_peak_is_capped_at_it():
    # the kernel's per-CPU counters can make the end's mark read 22 pages under the start's (seen in CI)
    capped = PeakReading(284_921_856, 1000 * MiB, 285_011_968)
    assert (capped.start_bytes, capped.rss_bytes, capped.rise_bytes) == (284_921_856, 284_921_856, 0)
    plain = PeakReading(700 * MiB, 1000 * MiB, 250 * MiB)
    assert (plain.start_bytes, plain.rise_bytes) == (250 * MiB, 450 * MiB)


@pytest.fixture()
def resettable():
    """The machines throttler runs on (and CI) must allow the reset: fail, never skip, where they do not."""
    assert peakrss.reset_high_water_mark(), "/proc/self/clear_refs is not writable: no per-task readings"


def test_reset_then_read_sees_a_short_lived_allocation(resettable):
    """A 256 MiB array allocated and freed between reset and read shows in the mark; after
    another reset it is gone."""
    peakrss.reset_high_water_mark()
    before = psutil.Process().memory_info().rss
    block = np.ones(256 * MiB // 8)  # touched: resident
    del block
    peak = peakrss.high_water_mark_bytes()
    assert peak >= before + 250 * MiB
    peakrss.reset_high_water_mark()
    assert peakrss.high_water_mark_bytes() < peak - 200 * MiB


def allocate_and_return_partial(n_bytes: int) -> Partial:
    block = np.ones(n_bytes // 8)
    return Partial(data=float(block[0]))


def allocate_and_return_summary(n_bytes: int) -> dict:
    block = np.ones(n_bytes // 8)
    return {"rows": int(block[:1].sum()), "worker_peak_rss_bytes": 1, "worker_memory_limit_bytes": 0}


def test_measured_task_attaches_its_reading(resettable):
    rss_before = psutil.Process().memory_info().rss
    part = Measured(allocate_and_return_partial)(128 * MiB)
    assert part.worker_peak.rss_bytes >= 128 * MiB
    assert part.worker_peak.limit_bytes == 0  # not on a Dask worker
    # the start is this process's RSS as the task began; the rise, the task's 128 MiB array
    assert abs(part.worker_peak.start_bytes - rss_before) < 32 * MiB
    assert 127 * MiB <= part.worker_peak.rise_bytes < 160 * MiB  # (a few pages of the start freed meanwhile)
    summary = Measured(allocate_and_return_summary)(64 * MiB)
    assert summary["worker_peak_rss_bytes"] >= 64 * MiB  # the higher reading replaced the 1 byte
    assert 63 * MiB <= summary["worker_peak_rss_bytes"] - summary["worker_start_rss_bytes"] < 96 * MiB
    assert pickle.loads(pickle.dumps(Measured(allocate_and_return_partial))).fn is allocate_and_return_partial


def test_graph_tasks_are_measured_and_the_final_summary_carries_the_highest(tmp_path, resettable):
    """Through dask's synchronous scheduler: every task measured, the summary has the peak."""
    from tests.helpers.datafiles import plan_for, write_sim

    files = [str(write_sim(tmp_path / f"f{i}.parquet", seed=i)) for i in range(4)]
    plan = plan_for("g", files, "aligned", files_per_task=1, fan_in=2)
    graph = graphs.build(plan, str(tmp_path / "out.parquet"))
    tasks = dict(graph.final.__dask_graph__())
    assert len(tasks) == graph.n_tasks == 4 + 2 + 1
    summary = graph.final.compute(scheduler="sync")
    assert summary["worker_peak_rss_bytes"] >= psutil.Process().memory_info().rss // 2

"""The memory model, the online correction and its persistence."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from throttler import durable
from throttler.errors import DataError
from throttler.planning import estimator as est
from throttler.planning import memory_model
from throttler.planning.estimator import Estimator, StrategyStats, updated_stats
from throttler.planning.footers import file_info
from throttler.planning.memory_model import (
    TaskPeaks,
    expansion,
    group_peak_bytes,
    largest_file,
    merge_task_count,
    naive_group_bytes,
    raw_task_peaks,
    rows_of,
)
from throttler.planning.plan import FileInfo

MiB = 2**20
ROWS = 6_000_000
#: the measured simulation file (see throttler.planning.estimator's docstring)
REAL = FileInfo("/data/f0.parquet", size_bytes=50_390_300, rows=ROWS, decoded_bytes=55_553_687)


# --------------------------------------------------------------------------- footers


def _write(path, rows=1000, row_group_size=300):
    table = pa.table({
        "path": np.repeat(np.arange(rows // 10, dtype=np.int64), 10),
        "Date": pa.array(np.tile(np.arange(10, dtype=np.int32), rows // 10), pa.date32()),
        "value": np.random.default_rng(0).standard_normal(rows),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


def test_file_info_reads_the_footer(tmp_path):
    path = str(tmp_path / "a.parquet")
    _write(path)
    info = file_info(path)
    md = pq.read_metadata(path)
    assert info.path == path
    assert info.rows == 1000
    assert md.num_row_groups == 4
    assert info.decoded_bytes == sum(md.row_group(i).total_byte_size for i in range(4)) > 8000
    assert info.size_bytes == os.stat(path).st_size


def test_file_info_turns_bad_files_into_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        file_info(str(tmp_path / "missing.parquet"))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Parquet footer"):
        file_info(str(junk))


# --------------------------------------------------------------------------- base model


def test_expansion_from_footers_and_default():
    assert expansion([REAL]) == pytest.approx(1.1025, abs=1e-3)
    assert expansion([FileInfo("x", 100)]) == memory_model.DEFAULT_EXPANSION


def test_naive_group_bytes_is_files_times_size_times_expansion():
    files = [REAL] * 10
    assert naive_group_bytes(files) == pytest.approx(10 * REAL.decoded_bytes, rel=1e-9)
    assert naive_group_bytes(files, 2.0) == 20 * REAL.size_bytes


def test_rows_unknown_are_bounded_from_above():
    unknown = FileInfo("x", size_bytes=REAL.size_bytes, decoded_bytes=REAL.decoded_bytes)
    assert ROWS <= rows_of(unknown) <= 1.2 * ROWS
    assert rows_of(FileInfo("y", size_bytes=800)) == 150  # 800 x 1.5 / 8


# --------------------------------------------------------------------------- strategy model

#: Peak RSS measured for throttler.worker.kernels' tasks on the real file, bytes per row:
#: (strategy, shape, files_per_task, inputs) -> B/row. The model must cover each.
#: Worker RSS over the idle worker, 2 threads, the task alone (benchmarks/calibrate_memory.py)
#: where measured there; the rest from fresh processes (RSS over RSS before the task).
MEASURED_BYTES_PER_ROW = {
    ("aligned", "leaf", 8, 0): 21.3, ("aligned", "leaf", 4, 0): 26.8,  # the 26.8: a cold first run
    ("aligned", "combine", 1, 2): 34.1, ("aligned", "combine", 1, 4): 50.2,
    ("aligned", "combine", 1, 8): 72.0, ("aligned", "final", 1, 2): 69.6,
    ("aligned", "final", 1, 8): 117.6,
    ("sum", "leaf", 8, 0): 122.3, ("sum", "combine", 1, 2): 101.0, ("sum", "combine", 1, 4): 155.7,
    ("sum", "combine", 1, 8): 187.0, ("sum", "final", 1, 2): 121.5, ("sum", "final", 1, 4): 174.2,
    # groupby with the int64-code regroup, on partials whose keys differ (the worst of 1t and 2t-solo)
    ("groupby", "leaf", 1, 0): 75.8, ("groupby", "leaf", 2, 0): 126.0, ("groupby", "leaf", 4, 0): 239.8,
    ("groupby", "combine", 1, 2): 173.7, ("groupby", "combine", 1, 4): 310.4, ("groupby", "combine", 1, 8): 481.5,
    ("groupby", "final", 1, 2): 174.0, ("groupby", "final", 1, 4): 307.8, ("groupby", "final", 1, 8): 506.1,
}


@pytest.mark.parametrize("case", sorted(MEASURED_BYTES_PER_ROW))
def test_model_covers_every_measured_peak(case):
    strategy, shape, files_per_task, inputs = case
    fan_in = max(inputs, 2)
    n_leaves = fan_in + 1 if shape == "combine" else max(inputs, 1)
    peaks = raw_task_peaks(strategy, REAL, files_per_task, fan_in, n_leaves)
    modelled = {"leaf": peaks.leaf_bytes, "combine": peaks.combine_bytes, "final": peaks.final_bytes}[shape]
    measured = MEASURED_BYTES_PER_ROW[case] * ROWS
    assert measured <= modelled <= 1.6 * measured + memory_model.TASK_OVERHEAD_BYTES


def test_streaming_leaves_do_not_grow_with_files_but_groupby_does():
    for strategy in ("aligned", "sum"):
        one = raw_task_peaks(strategy, REAL, 1, 8, 4).leaf_bytes
        assert raw_task_peaks(strategy, REAL, 500, 8, 4).leaf_bytes == one
    small = raw_task_peaks("groupby", REAL, 1, 8, 4).leaf_bytes
    big = raw_task_peaks("groupby", REAL, 4, 8, 4).leaf_bytes
    assert big - small == 3 * memory_model.GROUPBY_FILE_BYTES_PER_ROW * ROWS


def test_aligned_combine_holds_fan_in_plus_two_accumulators():
    peaks = raw_task_peaks("aligned", REAL, 1, 8, 20)
    assert peaks.combine_bytes == 10 * 8 * ROWS + memory_model.TASK_OVERHEAD_BYTES  # one more on a 2-thread worker
    assert peaks.result_bytes == 8 * ROWS


def test_no_combine_task_when_leaves_fit_one_final():
    assert raw_task_peaks("sum", REAL, 1, 8, 8).combine_bytes == 0
    assert raw_task_peaks("sum", REAL, 1, 8, 9).combine_bytes > 0


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="unknown strategy"):
        raw_task_peaks("auto", REAL, 1, 8, 2)


def test_largest_file_takes_each_maximum():
    a = FileInfo("a", 100, rows=10, decoded_bytes=500)
    b = FileInfo("b", 300, rows=5, decoded_bytes=200)
    big = largest_file([a, b])
    assert (big.size_bytes, big.rows, big.decoded_bytes) == (300, 10, 500)


# --------------------------------------------------------------------------- group peak


def test_merge_task_count_follows_the_graph_tree():
    assert merge_task_count(1, 8) == 1
    assert merge_task_count(8, 8) == 1
    assert merge_task_count(9, 8) == 3  # 2 combines + final
    assert merge_task_count(200, 8) == 30  # 25 + 4 combines + final


def test_group_peak_single_leaf_is_its_largest_tasks():
    peaks = TaskPeaks(leaf_bytes=100, combine_bytes=0, final_bytes=300, result_bytes=10)
    assert group_peak_bytes(peaks, n_leaves=1, concurrent_tasks=1, fan_in=8) == 300
    assert group_peak_bytes(peaks, n_leaves=1, concurrent_tasks=64, fan_in=8) == 400  # leaf + final


def test_group_peak_counts_running_tasks_and_waiting_results():
    peaks = TaskPeaks(leaf_bytes=100, combine_bytes=200, final_bytes=300, result_bytes=10)
    # 16 leaves, fan-in 8: 2 combines + final; 4 at once: the 3 merges and 1 leaf
    assert group_peak_bytes(peaks, 16, 4, 8) == 3 * 300 + 100 + 16 * 10
    # concurrency 1: one task, waiting results bounded by fan-in
    assert group_peak_bytes(peaks, 16, 1, 8) == 300 + 8 * 10


def test_group_peak_grows_with_concurrency():
    peaks = raw_task_peaks("aligned", REAL, 10, 8, 40)
    values = [group_peak_bytes(peaks, 40, c, 8) for c in (1, 2, 8, 40)]
    assert values == sorted(values) and values[0] < values[-1]


# --------------------------------------------------------------------------- learning


def test_correction_moves_up_fast():
    stats = updated_stats(StrategyStats(), predicted_bytes=100, observed_bytes=200)
    assert stats.correction == pytest.approx(1 + 0.75 * (2 - 1))
    assert (stats.count, stats.last_ratio, stats.ewma_ratio, stats.max_ratio) == (1, 2.0, 2.0, 2.0)


def test_correction_moves_down_slowly_and_never_below_the_model():
    stats = StrategyStats(correction=2.0, count=5, ewma_ratio=1.0, max_ratio=1.0)
    lower = updated_stats(stats, predicted_bytes=200, observed_bytes=100)
    assert lower.correction == pytest.approx(2.0 - 0.05 * (2.0 - 1.0))
    floor = StrategyStats()
    for _ in range(200):
        floor = updated_stats(floor, 1000, 10)
    assert floor.correction == est.MIN_CORRECTION


def test_correction_is_clamped_above():
    stats = StrategyStats()
    for _ in range(10):
        stats = updated_stats(stats, 100, 10_000)
        assert stats.correction <= est.MAX_CORRECTION
    assert stats.correction == pytest.approx(est.MAX_CORRECTION, rel=1e-5)


def test_ewma_ratio_weights_the_newest():
    stats = updated_stats(StrategyStats(), 100, 100)
    stats = updated_stats(stats, 100, 200)
    assert stats.ewma_ratio == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)


def test_estimator_applies_correction_and_safety():
    e = Estimator()
    base = e.task_peaks("aligned", [REAL], files_per_task=1, fan_in=8, n_leaves=2)
    e.observe("aligned", base.peak_bytes, 2 * base.peak_bytes)
    factor = e.correction("aligned")
    assert factor == pytest.approx(1.75)
    again = e.task_peaks("aligned", [REAL], files_per_task=1, fan_in=8, n_leaves=2, safety=1.5)
    assert again.peak_bytes == pytest.approx(base.peak_bytes * factor * 1.5, rel=1e-6)
    assert e.correction("sum") == 1.0


def test_observe_ignores_missing_figures_and_rejects_unknown_strategies():
    e = Estimator()
    assert e.observe("sum", 0, 100) == 1.0
    assert e.observe("sum", 100, 0) == 1.0
    assert e.accuracy()["sum"]["count"] == 0
    with pytest.raises(ValueError):
        e.observe("auto", 100, 100)


def test_accuracy_reports_every_strategy():
    e = Estimator()
    e.observe("groupby", 100, 150)
    acc = e.accuracy()
    assert set(acc) == {"aligned", "sum", "groupby", "dense"}
    assert acc["groupby"]["count"] == 1
    assert acc["groupby"]["last_ratio"] == 1.5
    assert acc["groupby"]["ewma_ratio"] == 1.5
    assert acc["groupby"]["correction"] > 1


def test_observations_are_thread_safe():
    e = Estimator()

    def work():
        for _ in range(250):
            e.observe("sum", 100, 90)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert e.accuracy()["sum"]["count"] == 2000


# --------------------------------------------------------------------------- persistence


def test_state_is_saved_and_loaded(tmp_path):
    path = tmp_path / "estimator.json"
    e = Estimator(path)
    e.observe("sum", 100, 300)
    data = json.loads(path.read_text())
    assert data["version"] == est.STATE_VERSION
    assert data["strategies"]["sum"]["count"] == 1
    again = Estimator(path)
    assert again.correction("sum") == e.correction("sum") > 1
    assert again.accuracy() == e.accuracy()
    assert [p.name for p in tmp_path.iterdir()] == ["estimator.json"]  # no temp file left


def test_missing_or_corrupt_state_gives_defaults(tmp_path):
    assert Estimator(tmp_path / "none.json").correction("aligned") == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert Estimator(bad).correction("aligned") == 1.0
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"strategies": {"sum": {"correction": 99.0}, "aligned": {"count": "x"},
                                              "groupby": [1, 2]}}))
    loaded = Estimator(odd)
    assert loaded.correction("sum") == est.MAX_CORRECTION
    assert loaded.correction("aligned") == 1.0 and loaded.accuracy()["aligned"]["count"] == 0
    assert loaded.observe("groupby", 100, 100) == 1.0  # a default entry, usable


def test_a_failed_save_is_logged_not_raised(tmp_path, caplog):
    e = Estimator(tmp_path / "gone" / "estimator.json")  # the directory does not exist
    assert e.observe("sum", 100, 200) > 1
    assert "cannot save" in caplog.text


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    durable.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        durable.write_json_atomic(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_observations_of_plans_made_before_an_update_do_not_ratchet():
    """Twenty groups planned at correction 1.0, each under-estimated 1.2x, finishing one by one:
    the correction settles at 1.2 instead of compounding to the cap."""
    est = Estimator()
    predicted = 100 * 2**20
    for _ in range(20):
        est.observe("aligned", predicted, int(predicted * 1.2), factor_used=1.0)
    assert abs(est.correction("aligned") - 1.2) < 0.01

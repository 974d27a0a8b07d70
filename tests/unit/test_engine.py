"""Every strategy equals an independent reference on small real Parquet files."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.datafiles import assert_matches_reference, plan_for, write_sim
from throttler.errors import DataError, MisalignedKeys
from throttler.worker import graphs

STRATEGIES = ["aligned", "sum", "groupby", "dense"]


def run_in_process(plan, out):
    return graphs.build(plan, str(out)).final.compute(scheduler="threads")


def _files(tmp_path, n, **kw):
    return [write_sim(tmp_path / f"f{i:04d}.parquet", seed=i, **kw) for i in range(n)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n_files,files_per_task,fan_in", [(1, 1, 2), (2, 1, 2), (7, 2, 3), (20, 3, 2)])
def test_strategy_matches_reference(tmp_path, strategy, n_files, files_per_task, fan_in):
    files = _files(tmp_path, n_files)
    summary = run_in_process(plan_for("g", files, strategy, files_per_task, fan_in), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert summary["files"] == n_files and summary["rows"] == 50 * 6
    assert summary["strategy"] == strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_500_files(tmp_path, strategy):
    files = _files(tmp_path, 500, n_paths=5, n_dates=3)
    summary = run_in_process(plan_for("g", files, strategy, 40, 4), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert summary["files"] == 500


@pytest.mark.parametrize("strategy", ["sum", "groupby"])
def test_shuffled_and_missing_paths_union_of_keys(tmp_path, strategy):
    files = [write_sim(tmp_path / "a.parquet", seed=1),
             write_sim(tmp_path / "b.parquet", seed=2, shuffle=True),
             write_sim(tmp_path / "c.parquet", seed=3, drop_paths=[0, 7, 49]),
             write_sim(tmp_path / "d.parquet", seed=4, n_paths=60)]
    run_in_process(plan_for("g", files, strategy), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_skipped_and_counted(tmp_path, strategy):
    files = _files(tmp_path, 3, nan_frac=0.2)
    expected_nans = sum(int(np.isnan(pq.read_table(f).column("value").to_numpy()).sum()) for f in files)
    summary = run_in_process(plan_for("g", files, strategy), tmp_path / "out.parquet")
    assert expected_nans > 0 and summary["nan_count"] == expected_nans
    assert_matches_reference(tmp_path / "out.parquet", files)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_in_one_file_of_a_leaf(tmp_path, strategy):
    """The aligned leaf adds first and checks its accumulator; a NaN anywhere is still skipped and counted."""
    files = [write_sim(tmp_path / "a.parquet", seed=1), write_sim(tmp_path / "b.parquet", seed=2),
             write_sim(tmp_path / "c.parquet", seed=3, nan_frac=0.05), write_sim(tmp_path / "d.parquet", seed=4)]
    expected_nans = int(np.isnan(pq.read_table(files[2]).column("value").to_numpy()).sum())
    summary = run_in_process(plan_for("g", files, strategy, files_per_task=4), tmp_path / "out.parquet")
    assert expected_nans > 0 and summary["nan_count"] == expected_nans
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert not np.isnan(pq.read_table(tmp_path / "out.parquet").column("value").to_numpy()).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("files_per_task", [1, 2, 3])
def test_opposite_infinities_sum_to_nan_and_count_no_nan(tmp_path, strategy, files_per_task):
    """inf + -inf is NaN by IEEE arithmetic: the result at that key, never a skipped input,
    whichever level of the tree adds them and whatever other files add to the key."""
    files = _files(tmp_path, 3)
    for path, inf in zip(files, (np.inf, -np.inf)):
        table = pq.read_table(path)
        values = table.column("value").to_numpy().copy()
        values[3] = inf
        pq.write_table(table.set_column(2, "value", pa.array(values)), path)
    summary = run_in_process(plan_for("g", files, strategy, files_per_task=files_per_task),
                             tmp_path / "out.parquet")
    out = pq.read_table(tmp_path / "out.parquet").column("value").to_numpy()
    assert summary["nan_count"] == 0
    assert np.isnan(out[3]) and np.isnan(out).sum() == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_values_and_narrow_types(tmp_path, strategy):
    files = [write_sim(tmp_path / "a.parquet", seed=1, value_type=pa.float32(), path_type=pa.int32()),
             write_sim(tmp_path / "b.parquet", seed=2, value_type=pa.float32(), path_type=pa.int32())]
    run_in_process(plan_for("g", files, strategy), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert pq.read_schema(tmp_path / "out.parquet").field("value").type == pa.float64()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("date_type", [pa.timestamp("us"), pa.timestamp("ms", tz="Europe/London"),
                                       pa.timestamp("ns")])
def test_dates_keep_their_type(tmp_path, strategy, date_type):
    files = _files(tmp_path, 2, date_type=date_type)
    run_in_process(plan_for("g", files, strategy), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert pq.read_schema(tmp_path / "out.parquet").field("Date").type == date_type


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_encoding_and_checksums(tmp_path, strategy):
    """Keys plain + zstd with statistics, values without statistics, page CRCs that verify."""
    files = _files(tmp_path, 3)
    run_in_process(plan_for("g", files, strategy, files_per_task=1), tmp_path / "out.parquet")
    pf = pq.ParquetFile(tmp_path / "out.parquet", page_checksum_verification=True)
    pf.read()  # every page's CRC checked
    chunks = {pf.metadata.row_group(0).column(i).path_in_schema: pf.metadata.row_group(0).column(i)
              for i in range(3)}
    assert chunks["path"].compression == chunks["Date"].compression == "ZSTD"
    assert "RLE_DICTIONARY" not in chunks["path"].encodings
    assert chunks["path"].is_stats_set and not chunks["value"].is_stats_set
    assert oct((tmp_path / "out.parquet").stat().st_mode & 0o777) == "0o640"
    data = bytearray((tmp_path / "out.parquet").read_bytes())  # one flipped bit in a value page: caught
    value_chunk = chunks["value"]
    data[value_chunk.data_page_offset + value_chunk.total_compressed_size - 5] ^= 0x01
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(OSError, match="(?i)crc|checksum"):
        pq.ParquetFile(tmp_path / "bad.parquet", page_checksum_verification=True).read()


def test_aligned_accepts_same_keys_with_different_encoding(tmp_path):
    """Different bytes (other row groups, other path width) but equal keys: still aligned."""
    files = [write_sim(tmp_path / "a.parquet", seed=1),
             write_sim(tmp_path / "b.parquet", seed=2, row_group_size=37, path_type=pa.int32())]
    run_in_process(plan_for("g", files, "aligned"), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)


@pytest.mark.parametrize("defect", [dict(shuffle=True), dict(drop_paths=[3]), dict(n_paths=51)])
def test_aligned_detects_misaligned_file(tmp_path, defect):
    files = [write_sim(tmp_path / "a.parquet", seed=1), write_sim(tmp_path / "b.parquet", seed=2, **defect)]
    with pytest.raises(MisalignedKeys, match="b.parquet"):
        run_in_process(plan_for("g", files, "aligned"), tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_aligned_unsorted_reference_is_sorted_in_output(tmp_path):
    files = [write_sim(tmp_path / f"{i}.parquet", seed=i, shuffle=True) for i in range(1)]
    files.append(str(tmp_path / "copy.parquet"))
    pq.write_table(pq.read_table(files[0]), files[1])
    run_in_process(plan_for("g", files, "aligned"), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_duplicated_keys_are_a_data_error(tmp_path, strategy):
    t = pq.read_table(write_sim(tmp_path / "a.parquet"))
    pq.write_table(pa.concat_tables([t, t.slice(0, 3)]), tmp_path / "dup.parquet")
    files = [str(tmp_path / "dup.parquet"), str(tmp_path / "dup.parquet")]
    with pytest.raises(DataError, match="duplicated key"):
        run_in_process(plan_for("g", files, strategy), tmp_path / "out.parquet")


def test_keys_unique_per_submission(tmp_path):
    files = _files(tmp_path, 4)
    plan = plan_for("g", files, "aligned")
    a, b = graphs.build(plan, "x"), graphs.build(plan, "x")
    keys_a, keys_b = set(a.final.dask.keys()), set(b.final.dask.keys())
    assert len(keys_a) == a.n_tasks and not keys_a & keys_b


@pytest.mark.parametrize("date_type", [pa.date32(), pa.timestamp("us", tz="UTC"), pa.date64()])
@pytest.mark.parametrize("seed", range(40))
def test_stored_keys_sorted_agrees_with_the_plain_check(date_type, seed):
    """Chunk-wise, block-wise checking gives the whole-array answer, at every chunk and block edge."""
    from throttler.worker import contract

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    paths = np.sort(rng.integers(0, 6, n))
    days = rng.integers(-3, 3, n) + np.arange(n) * (seed % 3)  # sometimes sorted within a path, often not
    if seed % 4 == 0 and n > 1:  # a clean strictly increasing case, then one swap at a random row
        paths, days = np.repeat(np.arange(n), 1), np.zeros(n, dtype=np.int64)
        if seed % 8 == 0:
            i = int(rng.integers(0, n - 1))
            paths[[i, i + 1]] = paths[[i + 1, i]]
    cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 4))))
    bounds = [0, *cuts.tolist(), n]
    unit = {32: "D", 64: "ms"}[date_type.bit_width] if not pa.types.is_timestamp(date_type) else "us"
    date_values = (days * (86_400_000 if unit == "ms" else 1)).astype(f"datetime64[{unit}]")
    dates = pa.chunked_array([pa.array(date_values[a:b]).cast(date_type) for a, b in zip(bounds, bounds[1:])],
                             type=date_type)
    path_chunks = pa.chunked_array([pa.array(paths[a:b], pa.int64()) for a, b in zip(bounds, bounds[1:])],
                                   type=pa.int64())
    expected = contract.keys_strictly_sorted(paths, days)
    assert contract.stored_keys_sorted(path_chunks, dates, block_rows=int(rng.integers(1, 8))) == expected
    assert contract.stored_keys_sorted(path_chunks, pa.chunked_array([dates.combine_chunks()])) == expected


# ------------------------------------------------------------------ the streamed aligned final


@pytest.mark.parametrize("n_files,files_per_task", [(1, 1), (3, 1), (4, 2)])
def test_aligned_final_streams_row_groups(tmp_path, monkeypatch, n_files, files_per_task):
    """Row groups of 7 rows (300 rows: 43 of them, the last one short), one to three partials."""
    from throttler.worker import kernels

    monkeypatch.setattr(kernels, "OUTPUT_ROW_GROUP_ROWS", 7)
    files = _files(tmp_path, n_files, row_group_size=11)  # reference batches cross its row groups
    summary = run_in_process(plan_for("g", files, "aligned", files_per_task), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    meta = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert meta.num_row_groups == 43 and meta.row_group(42).num_rows == 300 - 42 * 7
    assert summary["rows"] == 300 and summary["files"] == n_files


def test_aligned_keys_out_of_order_only_across_a_row_group_boundary(tmp_path, monkeypatch):
    """Each 150-row batch is sorted; the second starts below the first's end: sorted whole instead."""
    from throttler.worker import kernels

    monkeypatch.setattr(kernels, "OUTPUT_ROW_GROUP_ROWS", 150)
    table = pq.read_table(write_sim(tmp_path / "sorted.parquet"))  # 50 paths x 6 dates
    swapped = pa.concat_tables([table.slice(150), table.slice(0, 150)])  # paths 25-49, then 0-24
    files = []
    for i in range(2):
        values = pa.array(np.random.default_rng(i).standard_normal(300))
        files.append(str(tmp_path / f"f{i}.parquet"))
        pq.write_table(swapped.set_column(2, "value", values), files[-1])
    run_in_process(plan_for("g", files, "aligned", 1), tmp_path / "out.parquet")
    assert_matches_reference(tmp_path / "out.parquet", files)
    assert pq.read_table(tmp_path / "out.parquet").column("path").to_pylist()[0] == 0
    # the streamed attempt's temporary file is gone: only the inputs and the output remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.parquet", "f1.parquet", "out.parquet",
                                                          "sorted.parquet"]


def test_aligned_final_error_while_streaming_leaves_no_file_and_no_thread(tmp_path, monkeypatch):
    """A key that decodes as null in the reference's second row group: a DataError naming it;
    no output, no temporary file, and the preparing thread is gone."""
    import threading

    from throttler.worker import kernels

    monkeypatch.setattr(kernels, "OUTPUT_ROW_GROUP_ROWS", 100)
    table = pq.read_table(write_sim(tmp_path / "src.parquet"))
    paths = table.column("path").to_pylist()
    paths[250] = None
    broken = table.set_column(0, "path", pa.array(paths, pa.int64()))
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    for f in files:
        pq.write_table(broken, f)
    with pytest.raises(DataError, match="a.parquet: null keys"):
        run_in_process(plan_for("g", files, "aligned", 1), tmp_path / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "src.parquet"]
    assert not [t for t in threading.enumerate() if t.name == "throttler-ahead"]


@pytest.mark.parametrize("n_files", [1, 3])
def test_output_write_failing_mid_stream_raises_oserror_and_leaves_nothing(tmp_path, n_files):
    """A real failing write: the process may not grow a file past 20 kB (RLIMIT_FSIZE, the
    write returns EFBIG), like a full disk part way through the output. The error is an
    OSError (a transient failure to the retry policy) and no partial or temporary file stays."""
    import subprocess
    import sys

    files = _files(tmp_path, n_files, n_paths=2000, n_dates=6)  # 12,000 rows: about 100 kB of output
    script = f"""
import errno, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from throttler.worker import graphs
from tests.helpers.datafiles import plan_for
try:
    graphs.build(plan_for("g", {files!r}, "aligned", 2), {str(tmp_path / "out.parquet")!r}).final.compute(
        scheduler="sync")
except OSError as exc:
    print("OSError", exc.errno == errno.EFBIG)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[2]))  # tests/ importable
    assert done.stdout.strip() == "OSError True", done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.rsplit("/", 1)[1] for p in files)


def test_groupby_combine_adds_partials_with_identical_keys_else_regroups(tmp_path):
    from throttler.worker import kernels

    same = [kernels.groupby_leaf([f]) for f in _files(tmp_path, 3, nan_frac=0.1)]
    other = kernels.groupby_leaf([write_sim(tmp_path / "x.parquet", seed=9, drop_paths=(3,))])
    assert kernels._add_if_same_keys([p.data for p in same]) is not None
    assert kernels._add_if_same_keys([same[0].data, other.data]) is None
    combined = kernels.groupby_combine(same)
    regrouped = kernels._grouped(__import__("pandas").concat([p.data for p in same], ignore_index=True))
    np.testing.assert_array_equal(combined.data[["path", "Date"]].to_numpy(), regrouped[["path", "Date"]].to_numpy())
    np.testing.assert_allclose(combined.data["value"].to_numpy(), regrouped["value"].to_numpy(), rtol=1e-12)
    assert combined.nan_count == sum(p.nan_count for p in same) and combined.files == 3

"""Property tests: on random small groups, the dense strategy equals DuckDB's GROUP BY.

Groups mix what real estates hold: shuffled rows, missing and extra paths, sparse
path IDs, int16/int32/int64/uint16 paths, date32 and timestamp dates, NaN and
infinities, files byte-identical to the reference next to files that are not,
and groups of several leaves and combines.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.datafiles import plan_for, read_output
from tests.unit.test_properties import duckdb_reference
from throttler.commands.generate import simulation_dates
from throttler.planning.memory_model import merge_task_count
from throttler.worker import graphs

FILE = st.fixed_dictionaries({
    "copy_of_first": st.booleans(),  # byte-identical keys to the group's first file
    "shuffle": st.booleans(),
    "n_paths": st.integers(1, 25),
    "first_path": st.integers(0, 5),
    "drop_every": st.sampled_from([0, 2, 3]),
    "path_type": st.sampled_from([pa.int16(), pa.int32(), pa.int64(), pa.uint16()]),
    "date_type": st.sampled_from([pa.date32(), pa.timestamp("ms"), pa.timestamp("ns")]),
    "specials": st.sampled_from([0.0, 0.1]),  # share of values replaced by NaN, inf or -inf
    "n_dates": st.integers(1, 5),
})


def write_file(path, spec, stride, seed, first_table=None):
    """One file of ``spec``; with ``copy_of_first``, the first file's keys and new values."""
    rng = np.random.default_rng(seed)
    if first_table is not None and spec["copy_of_first"]:
        table = first_table.set_column(2, "value", pa.array(rng.standard_normal(first_table.num_rows)))
    else:
        ids = np.arange(spec["first_path"], spec["first_path"] + spec["n_paths"], dtype=np.int64)
        if spec["drop_every"]:
            ids = ids[ids % spec["drop_every"] != 0]
        dates = simulation_dates(spec["n_dates"], 0)
        paths = np.repeat(ids * stride, len(dates))
        values = rng.standard_normal(len(paths))
        special = rng.random(len(values)) < spec["specials"]
        values[special] = rng.choice([np.nan, np.inf, -np.inf], int(special.sum()))
        order = rng.permutation(len(paths)) if spec["shuffle"] else np.arange(len(paths))
        table = pa.table({"path": pa.array(paths[order]).cast(spec["path_type"]),
                          "Date": pa.array(np.tile(dates, len(ids))[order], pa.date32()).cast(spec["date_type"]),
                          "value": values[order]})
    pq.write_table(table, path, row_group_size=int(rng.integers(7, 40)))
    return str(path), table


def write_group(root, files, stride, seed):
    paths, first = [], None
    for i, spec in enumerate(files):
        path, table = write_file(root / f"f{i}.parquet", spec, stride, seed + i, first)
        paths.append(path)
        first = table if first is None else first
    return paths


def check_against_duckdb(out, paths):
    want = duckdb_reference(paths)
    got = read_output(out)
    np.testing.assert_array_equal(got["path"].to_numpy(), want["path"])
    np.testing.assert_array_equal(got["Date"].to_numpy(), want["d"].astype("datetime64[ns]"))
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"], rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(FILE, min_size=1, max_size=6), files_per_task=st.integers(1, 3),
       fan_in=st.integers(2, 3), stride=st.sampled_from([1, 1, 7, 1000]), seed=st.integers(0, 10_000))
def test_dense_equals_duckdb(tmp_path_factory, files, files_per_task, fan_in, stride, seed):
    root = tmp_path_factory.mktemp("group")
    paths = write_group(root, files, stride, seed)
    out = root / "out.parquet"
    summary = graphs.build(plan_for("g", paths, "dense", files_per_task, fan_in), str(out)).final.compute(
        scheduler="sync")
    check_against_duckdb(out, paths)
    nans = sum(int(np.isnan(pq.read_table(p).column("value").to_numpy()).sum()) for p in paths)
    assert (summary["nan_count"], summary["files"]) == (nans, len(paths))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(FILE, min_size=5, max_size=7), seed=st.integers(0, 10_000))
def test_dense_on_a_real_cluster_with_several_leaves_and_combines(tmp_path_factory, client, files, seed):
    root = tmp_path_factory.mktemp("group")
    paths = write_group(root, files, 1, seed)
    out = root / "out.parquet"
    graph = graphs.build(plan_for("g", paths, "dense", files_per_task=1, fan_in=2), str(out))
    summary = client.compute(graph.final).result()
    assert graph.n_tasks == len(paths) + merge_task_count(len(paths), 2)  # leaves, combines, the final
    assert summary["files"] == len(paths) and summary["worker_peak_rss_bytes"] is not None
    assert 0 < summary["worker_start_rss_bytes"] <= summary["worker_peak_rss_bytes"]
    check_against_duckdb(out, paths)

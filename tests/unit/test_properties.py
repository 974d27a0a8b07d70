"""Property test: on random small groups, every strategy equals DuckDB's GROUP BY."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.datafiles import plan_for, read_output, write_sim
from throttler.worker import graphs

DEFECTS = st.fixed_dictionaries({}, optional={
    "shuffle": st.booleans(),
    "drop_paths": st.lists(st.integers(0, 19), max_size=4),
    "nan_frac": st.sampled_from([0.0, 0.1]),
    "value_type": st.sampled_from([pa.float32(), pa.float64()]),
    "path_type": st.sampled_from([pa.int32(), pa.int64(), pa.uint16()]),
})


def duckdb_reference(paths):
    files = ", ".join(f"'{p}'" for p in paths)
    return duckdb.sql(
        f"SELECT path::BIGINT AS path, CAST(\"Date\" AS TIMESTAMP) AS d, "
        f"COALESCE(SUM(value::DOUBLE) FILTER (WHERE NOT isnan(value::DOUBLE)), 0) AS value "
        f"FROM read_parquet([{files}], union_by_name=true) GROUP BY ALL ORDER BY path, d").fetchnumpy()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(DEFECTS, min_size=1, max_size=6), files_per_task=st.integers(1, 4),
       fan_in=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_every_strategy_equals_duckdb(tmp_path_factory, files, files_per_task, fan_in, seed):
    root = tmp_path_factory.mktemp("group")
    paths = [write_sim(root / f"f{i}.parquet", n_paths=20, n_dates=5, seed=seed + i, **defects)
             for i, defects in enumerate(files)]
    want = duckdb_reference(paths)
    aligned_ok = all(not d.get("shuffle") and not d.get("drop_paths") for d in files)
    for strategy in ["sum", "groupby"] + (["aligned"] if aligned_ok else []):
        out = root / f"out-{strategy}.parquet"
        graphs.build(plan_for("g", paths, strategy, files_per_task, fan_in), str(out)).final.compute(
            scheduler="sync")
        got = read_output(out)
        np.testing.assert_array_equal(got["path"].to_numpy(), want["path"])
        np.testing.assert_array_equal(got["Date"].to_numpy(), want["d"].astype("datetime64[ns]"))
        np.testing.assert_allclose(got["value"].to_numpy(), want["value"], rtol=1e-9, atol=1e-12)

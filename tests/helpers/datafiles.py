"""Helpers that write small simulation files with chosen defects, and the reference sum."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from throttler.commands.generate import simulation_dates
from throttler.planning.plan import FileInfo, Plan


def write_sim(path, n_paths=50, n_dates=6, seed=0, *, shuffle=False, drop_paths=(), nan_frac=0.0,
              value_type=pa.float64(), path_type=pa.int64(), date_type=pa.date32(), row_group_size=None):
    """Write one small simulation file; returns its path."""
    rng = np.random.default_rng(seed)
    dates = simulation_dates(n_dates, 0)
    paths = np.repeat(np.arange(n_paths, dtype=np.int64), n_dates)
    days = np.tile(dates, n_paths)
    values = rng.standard_normal(len(paths))
    keep = ~np.isin(paths, np.asarray(drop_paths, dtype=np.int64))
    paths, days, values = paths[keep], days[keep], values[keep]
    if nan_frac:
        values[rng.random(len(values)) < nan_frac] = np.nan
    if shuffle:
        order = rng.permutation(len(paths))
        paths, days, values = paths[order], days[order], values[order]
    date_arr = pa.array(days, pa.date32())
    if date_type != pa.date32():
        date_arr = date_arr.cast(date_type)
    table = pa.table({"path": pa.array(paths).cast(path_type), "Date": date_arr,
                      "value": pa.array(values).cast(value_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def reference_sum(paths) -> pd.DataFrame:
    """Independent reference: pandas concat + groupby().sum() (NaN skipped).

    Hard links of one file are read once and their values multiplied by the
    number of links, so an estate of many links of a few files stays cheap.
    """
    frames = []
    copies: dict[tuple[int, int], list] = {}
    for p in paths:
        st = os.stat(p)
        copies.setdefault((st.st_dev, st.st_ino), []).append(p)
    for same in copies.values():
        t = pq.read_table(same[0], columns=["path", "Date", "value"])
        frames.append(pd.DataFrame({
            "path": t.column("path").to_numpy().astype(np.int64),
            "Date": t.column("Date").cast(pa.timestamp("ns")).to_numpy(),
            "value": t.column("value").to_numpy(zero_copy_only=False).astype(np.float64) * len(same),
        }))
    out = pd.concat(frames).groupby(["path", "Date"], sort=True)["value"].sum().reset_index()
    return out


def read_output(path) -> pd.DataFrame:
    t = pq.read_table(path)
    return pd.DataFrame({
        "path": t.column("path").to_numpy(),
        "Date": t.column("Date").cast(pa.timestamp("ns")).to_numpy(),
        "value": t.column("value").to_numpy(),
    })


def assert_matches_reference(output_path, input_paths, rtol=1e-9):
    got, want = read_output(output_path), reference_sum(input_paths)
    assert list(pq.read_schema(output_path).names) == ["path", "Date", "value"]
    assert len(got) == len(want), (len(got), len(want))
    np.testing.assert_array_equal(got["path"].to_numpy(), want["path"].to_numpy())
    np.testing.assert_array_equal(got["Date"].to_numpy(), want["Date"].to_numpy())
    scale = np.maximum(np.abs(want["value"].to_numpy()), 1.0)
    np.testing.assert_array_less(np.abs(got["value"].to_numpy() - want["value"].to_numpy()), rtol * scale + 1e-300)


def plan_for(group, paths, strategy, files_per_task=2, fan_in=2) -> Plan:
    files = tuple(FileInfo(str(p), os.path.getsize(p)) for p in paths)
    return Plan(group, strategy, files, files_per_task=files_per_task, fan_in=fan_in,
                task_peak_bytes=1, group_peak_bytes=1, expansion=1.0)

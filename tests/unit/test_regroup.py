"""The sort-based regroup of group-by partials, against pandas' group-by."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from throttler.worker import kernels, regroup


def _pandas(parts):
    frame = pd.concat([regroup.as_frame(*p) for p in parts], ignore_index=True)
    out = frame.groupby(["path", "Date"], sort=True, as_index=False)["value"].sum(skipna=False)
    return out["path"].to_numpy(), out["Date"].to_numpy(), out["value"].to_numpy()


def _part(rng, n, path_lo, path_hi, dates):
    p = rng.integers(path_lo, path_hi, n, dtype=np.int64)
    d = rng.choice(dates, n)
    return p, d, rng.normal(size=n)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_parts=st.integers(1, 4), rows=st.integers(0, 300),
       path_lo=st.sampled_from([-2**62, -5, 0, 10**12]), span=st.sampled_from([1, 7, 1000, 2**40]))
def test_regroup_equals_pandas(seed, n_parts, rows, path_lo, span):
    rng = np.random.default_rng(seed)
    dates = np.array(sorted(rng.choice(10**12, 5, replace=False)), np.int64) * 1000
    parts = [_part(rng, rows, path_lo, path_lo + span, dates) for _ in range(n_parts)]
    out = regroup.regroup(parts)
    want = _pandas(parts)
    np.testing.assert_array_equal(out[0], want[0])
    np.testing.assert_array_equal(out[1], want[1])
    np.testing.assert_allclose(out[2], want[2], rtol=1e-12, atol=1e-12)


def test_nan_and_opposite_infinities_propagate_as_pandas_skipna_false():
    dates = np.array([10, 20], np.int64)
    a = (np.array([1, 1, 2]), dates[[0, 1, 0]], np.array([np.inf, np.nan, 1.0]))
    b = (np.array([1, 2]), dates[[0, 0]], np.array([-np.inf, 2.0]))
    paths, out_dates, values = regroup.regroup([a, b])
    assert paths.tolist() == [1, 1, 2]
    assert out_dates.tolist() == [10, 20, 10]
    assert np.isnan(values[0]) and np.isnan(values[1]) and values[2] == 3.0


def test_keys_too_spread_for_one_int64_are_left_to_pandas():
    parts = [(np.array([-2**62, 2**62 - 1]), np.array([0, 3]), np.array([1.0, 2.0])),
             (np.array([2**62 - 1]), np.array([3]), np.array([5.0]))]
    assert regroup.regroup(parts) is None
    frame = kernels._regrouped(parts)  # the kernel's fall-back: pandas' hash group-by
    assert frame.sort_values(["path", "Date"])["value"].tolist() == [1.0, 7.0]


def test_empty_parts_give_an_empty_result():
    empty = (np.array([], np.int64), np.array([], np.int64), np.array([], np.float64))
    paths, dates, values = regroup.regroup([empty, empty])
    assert (len(paths), len(dates), len(values)) == (0, 0, 0)

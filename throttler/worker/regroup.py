"""Sum group-by partials whose keys differ, by a sort over one int64 key a row.

A group-by partial is a (path, Date, value) frame with unique keys. Partials of
files with identical keys are added as arrays (:mod:`throttler.worker.kernels`);
the others must be regrouped. pandas does that by concatenating them and
hashing the two key columns: 154 B a row over the inputs already held, for two
seed-shaped partials (``benchmarks/groupby_combine_peak.py``).

Here each row's two keys become one int64, ``(path - path_min) x n_dates +
date_code`` (``date_code``: the rank of its Date among the partials' distinct
dates, of which simulation files have few), so the (path, Date) order is the
order of that one integer. One stable argsort of the concatenated codes (a merge
of sorted runs when the partials come sorted, as grouped results of sorted files
do), a take of codes and values, and ``np.add.reduceat`` over the runs of equal
codes give the sums already sorted by (path, Date). Temporaries are dropped as
soon as they are used, so the peak is a few int64/float64 arrays of the input
rows. NaN propagates (a NaN here is the IEEE sum of opposite infinities and must
stay NaN), as ``groupby(...).sum(skipna=False)`` does.

When ``path range x n_dates`` does not fit an int64 (sparse 64-bit paths), the
caller falls back to pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from throttler.worker import contract

INT64_CODES = 2**63  #: codes must stay below this

#: Arrays of the input rows' size alive at once at the peak (codes, order, sorted codes,
#: values, sorted values): the kernels' own account of a regroup, in bytes per value byte.
HELD_PER_VALUE_BYTE = 5


Keys = tuple[np.ndarray, np.ndarray, np.ndarray]  #: (path int64, Date int64 ns, value float64) arrays


def regroup_frames(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    """:func:`regroup` over (path, Date, value) frames, as a frame; None as :func:`regroup`."""
    out = regroup([(f["path"].to_numpy(np.int64), f["Date"].to_numpy(np.int64),
                    f[contract.VALUE_COLUMN].to_numpy(np.float64)) for f in frames])
    return None if out is None else as_frame(*out)


def as_frame(paths: np.ndarray, dates: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "Date": dates, contract.VALUE_COLUMN: values}, copy=False)


def regroup(parts: list[Keys]) -> Keys | None:
    """The parts' values summed by (path, Date), sorted by it; None when the keys cannot be coded in an int64.

    Keys may repeat across parts and within one (they are summed); callers
    check the contract's uniqueness within a file before.
    """
    path_min = min((int(p.min()) for p, _, _ in parts if len(p)), default=0)
    path_max = max((int(p.max()) for p, _, _ in parts if len(p)), default=0)
    dates = np.unique(np.concatenate([pd.unique(d) for _, d, _ in parts]))
    n_dates = max(1, len(dates))
    if (path_max - path_min + 1) * n_dates >= INT64_CODES:
        return None
    codes = _codes(parts, path_min, n_dates, dates)
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    values = np.concatenate([v for _, _, v in parts])[order]
    del order
    starts = _run_starts(codes)
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says: no warning
        sums = np.add.reduceat(values, starts) if len(values) else values
    del values
    codes = codes[starts]
    paths, date_codes = np.divmod(codes, n_dates)
    del codes
    paths += path_min
    return paths, dates[date_codes], sums


def _codes(parts: list[Keys], path_min: int, n_dates: int, dates: np.ndarray) -> np.ndarray:
    """One int64 a row, ordered as (path, Date), written part by part into one array."""
    codes = np.empty(sum(len(p) for p, _, _ in parts), np.int64)
    offset = 0
    for p, d, _ in parts:
        out = codes[offset:offset + len(p)]
        np.subtract(p, path_min, out=out)
        out *= n_dates
        out += np.searchsorted(dates, d)
        offset += len(p)
    return codes


def _run_starts(sorted_codes: np.ndarray) -> np.ndarray:
    """Index of the first row of each run of equal codes."""
    change = np.empty(len(sorted_codes), bool)
    if len(change):
        change[0] = True
        np.not_equal(sorted_codes[1:], sorted_codes[:-1], out=change[1:])
    return np.flatnonzero(change)

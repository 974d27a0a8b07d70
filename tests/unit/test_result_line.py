"""The line ``throttler run`` prints per group: counts of files in the right number."""

from __future__ import annotations

from throttler.commands.run import result_line

DONE = {"group": "g", "rows": 1200, "strategy": "aligned", "seconds": 1.5, "bytes": 3 * 2**20, "nan_count": 0,
        "worker_peak_fraction": 0.25, "output": "/out/g.parquet", "run_kind": "full",
        "run_reason": "no previous output"}


def test_one_file_is_one_file():
    assert result_line("done", {**DONE, "files": 1, "files_read": 1}) == (
        "ok     g: 1,200 rows from 1 file in 1.50 s (aligned, full (no previous output): 1 file read, "
        "3.0 MiB read, 0 NaN, worker peak 25% of its limit) -> /out/g.parquet")


def test_several_files_are_files():
    assert result_line("done", {**DONE, "files": 4, "files_read": 4}) == (
        "ok     g: 1,200 rows from 4 files in 1.50 s (aligned, full (no previous output): 4 files read, "
        "3.0 MiB read, 0 NaN, worker peak 25% of its limit) -> /out/g.parquet")


def test_an_unchanged_group_of_one_file():
    record = {**DONE, "files": 1, "files_read": 0, "run_kind": "unchanged"}
    assert result_line("done", record) == (
        "ok     g: 1,200 rows from 1 file (unchanged: no file new or changed, 0 files read, output untouched) "
        "-> /out/g.parquet")

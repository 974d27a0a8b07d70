"""``benchmarks/memory_touch.py``: the DAMON schemes it names and the page-cache residency it prints."""

from __future__ import annotations

import os

from benchmarks import memory_touch as bench


def _scheme(root, kdamond: str, state: str, aggr_us: int, action: str, min_age: int) -> None:
    context = root / kdamond / "contexts" / "0"
    (context / "monitoring_attrs" / "intervals").mkdir(parents=True)
    (root / kdamond / "state").write_text(state + "\n")
    (context / "monitoring_attrs" / "intervals" / "aggr_us").write_text(f"{aggr_us}\n")
    scheme = context / "schemes" / "0"
    (scheme / "access_pattern" / "age").mkdir(parents=True)
    (scheme / "action").write_text(action + "\n")
    (scheme / "access_pattern" / "age" / "min").write_text(f"{min_age}\n")


def test_running_schemes_are_named_with_their_idle_age_in_seconds(tmp_path):
    _scheme(tmp_path, "0", "on", 5_000_000, "pageout", 12)  # this VM's: 12 aggregations of 5 s
    _scheme(tmp_path, "1", "off", 100_000, "hugepage", 3)  # stopped: not listed
    assert bench.damon_schemes(str(tmp_path)) == ["pageout of regions idle >= 60 s"]
    assert bench.damon_schemes(str(tmp_path / "missing")) == []


def test_residency_counts_the_pages_in_the_cache(tmp_path):
    folder = tmp_path / "group"
    folder.mkdir()
    path = folder / "a.parquet"
    size = 3 * 1024 * 1024 + 100  # not a whole number of pages
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    assert bench.resident_bytes(str(path)) == (size, size)  # just written: all of it cached
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean and unmapped: dropped
    finally:
        os.close(fd)
    assert bench.resident_bytes(str(path)) == (0, size)
    (folder / "empty.parquet").write_bytes(b"")
    assert bench.resident_bytes(str(folder / "empty.parquet")) == (0, 0)
    assert bench.residency_rows(str(tmp_path)) == ["| group | 0 of 3 MiB (0%) |"]
    with open(path, "rb") as fh:
        fh.read(1024 * 1024)  # the first MiB back (and whatever the kernel reads ahead)
    cached, _ = bench.resident_bytes(str(path))
    assert 1024 * 1024 <= cached <= size  # (read-ahead may still be filling in: a range, not a figure)


def test_the_command_prints_the_residency_table_before_the_fills(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.parquet").write_bytes(b"\0" * 4096)
    bench.main(["--sizes-mib", "1", "--pauses", "0", "--runs", "1", "--residency", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("free page reporting: ") and lines[1].startswith("DAMON schemes: ")
    assert lines[3:6] == ["| folder | in the page cache |", "|---|---:|", "| g | 0 of 0 MiB (100%) |"]
    fills = [line for line in lines if line.startswith("| 1 MiB | ")]
    assert len(fills) == 1 and fills[0].count(" ms (") == 2  # the first fill and the one after 0 s

"""``throttler plan`` checks its group before it starts or connects to any cluster.

The child runs with distributed logging at INFO (the helpers' default is
WARNING, which an embedded cluster starting cleanly does not reach), so a
cluster started by mistake shows as ``distributed.`` lines on stderr.
"""

from __future__ import annotations

from tests.helpers import daemon as helpers
from tests.helpers.daemon import throttler_cli
from tests.helpers.datafiles import write_sim


def test_an_unknown_group_exits_2_in_one_line_without_starting_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setitem(helpers.CHILD_ENV, "DASK_LOGGING__DISTRIBUTED", "info")
    result = throttler_cli("plan", "nosuch", "--data-root", str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == \
        f"throttler: unknown group 'nosuch': no directory {tmp_path / 'nosuch'}", result.stderr
    assert "distributed" not in result.stderr, result.stderr  # no scheduler or worker logged a line
    assert result.stdout == ""


def test_a_group_of_one_file_is_planned_on_the_embedded_cluster(tmp_path):
    (tmp_path / "g").mkdir()
    write_sim(tmp_path / "g" / "f00.parquet", seed=1)
    result = throttler_cli("plan", "g", "--data-root", str(tmp_path), "--workers", "1",
                           "--worker-memory-bytes", "1000000000", timeout_seconds=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("group g: 1 file, "), lines
    assert lines[3].startswith("fits now: yes ("), lines

"""The commands as a newcomer meets them, at realistic size and duration.

Seed-shaped files (50,000 paths x 120 dates, 6,000,000 rows each), groups that
run for several seconds (longer than the 2 s after which ``throttler run`` used
to give up), progress lines on a non-terminal stderr, ``run`` against the
embedded cluster and an external ``dask scheduler``, and inputs that must be
refused before any cluster starts.
"""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest

from tests.conftest import wait_for
from tests.helpers.daemon import ExternalCluster, Proc, group_members, throttler_cli
from tests.helpers.datafiles import assert_matches_reference, write_sim

SEED_PATHS, SEED_DATES = 50_000, 120


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    """'wide': 500 files (hard links of 2 seed-shaped files); 'twelve': 12 and 'sixty': 60 such files
    (sizes chosen so that each strategy's group outlasts the old 2 s wait on an idle machine too);
    'two': 2 such files (a group that ends while 'wide' is still early on)."""
    root = tmp_path_factory.mktemp("estate")
    physical = [write_sim(root / f"p{i}.parquet", SEED_PATHS, SEED_DATES, seed=i) for i in range(2)]
    groups = {"wide": 500, "twelve": 12, "sixty": 60, "two": 2}
    for group, n in groups.items():
        (root / group).mkdir()
        for i in range(n):
            os.link(physical[i % 2], root / group / f"f{i:03d}.parquet")
    return root, {g: sorted(str(p) for p in (root / g).iterdir()) for g in groups}


def _run(estate_root, out, group, *extra, timeout_seconds=300):
    return throttler_cli("run", group, "--data-root", str(estate_root), "--output", str(out),
                         "--progress-seconds", "0.5", *extra, timeout_seconds=timeout_seconds)


def _progress(stderr: str, group: str) -> list[tuple[int, int]]:
    """(files read, files) of the last attempt's progress lines (a retry starts again from 0)."""
    lines = re.findall(rf"^progress {group}: (\d+)/(\d+) files, .*?(?:, attempt (\d+))?\)$", stderr, re.M)
    last = max((int(attempt or 1) for *_, attempt in lines), default=1)
    return [(int(a), int(b)) for a, b, attempt in lines if int(attempt or 1) == last]


@pytest.mark.parametrize("strategy, group", [("auto", "wide"), ("sum", "sixty"), ("groupby", "twelve")])
def test_run_completes_long_groups_of_every_strategy_with_file_progress(estate, tmp_path, strategy, group):
    root, files = estate
    done = _run(root, tmp_path / "out", group, "--strategy", strategy, "--workers", "2",
                "--worker-memory-bytes", str(4 * 2**30))
    assert done.returncode == 0, done.stdout + done.stderr
    line = re.search(rf"^ok     {group}: 6,000,000 rows from {len(files[group])} files in ([\d.]+) s \((\w+)",
                     done.stdout, re.M)
    assert line, done.stdout + done.stderr
    assert float(line.group(1)) > 2.0, "the group must outlast the old 2 s wait to prove the fix"
    assert line.group(2) == ("aligned" if strategy == "auto" else strategy)
    progress = _progress(done.stderr, group)
    assert progress, done.stderr
    assert all(total == len(files[group]) for _, total in progress)
    assert [n for n, _ in progress] == sorted(n for n, _ in progress)  # never goes back
    assert_matches_reference(tmp_path / "out" / f"{group}.parquet", files[group])


def test_run_on_an_external_scheduler_with_quiet(estate, tmp_path):
    root, files = estate
    (tmp_path / "cluster").mkdir()
    cluster = ExternalCluster(tmp_path / "cluster", n_workers=2, memory_bytes=3 * 2**30, declare_memory=False)
    try:
        cluster.connect(2)
        done = _run(root, tmp_path / "out", "twelve", "--strategy", "sum", "--scheduler", cluster.address, "--quiet")
    finally:
        cluster.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "progress " not in done.stderr
    assert re.search(r"^ok     twelve: 6,000,000 rows from 12 files in [\d.]+ s \(sum,", done.stdout, re.M), done.stdout
    assert_matches_reference(tmp_path / "out" / "twelve.parquet", files["twelve"])


@pytest.mark.parametrize("signum, whole_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c in a terminal", "sigterm from argo or timeout"])
def test_an_interrupted_run_stops_at_once_and_leaves_nothing_behind(estate, tmp_path, signum, whole_group):
    """Ctrl-C in a terminal (SIGINT to the command's whole process group, the embedded workers
    included) and SIGTERM to the command alone (Argo, Kubernetes, ``timeout``), while a 500-file
    group is some files in: the group that had ended keeps its line and output; the running one
    gets a STOPPED line instead of running on (it has hundreds of files left); exit 128 + the signal;
    no traceback, no output or temporary file of the stopped group, no private queue, no process left."""
    root, files = estate
    run_tmp, out = tmp_path / "tmp", tmp_path / "out"
    run_tmp.mkdir()
    command = Proc([sys.executable, "-m", "throttler", "run", "two", "wide", "--data-root", str(root),
                    "--output", str(out), "--progress-seconds", "0.5", "--workers", "2",
                    "--worker-memory-bytes", str(4 * 2**30)], tmp_path / "run.log", env={"TMPDIR": str(run_tmp)})
    try:
        wait_for(lambda: re.search(r"^ok     two: ", command.log(), re.M)
                 and any(0 < n < len(files["wide"]) for n, _ in _progress(command.log(), "wide")), 240)
        if whole_group:
            os.killpg(command.pid, signum)
        else:
            command.signal(signum)
        code = command.wait(60)
        log = command.log()
        assert code == 128 + signum, log
        assert f"STOPPED wide: interrupted by {signal.Signals(signum).name} before it ended" in log, log
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
        assert sorted(os.listdir(out)) == ["two.parquet"]  # wide: no output, no temporary
        assert_matches_reference(out / "two.parquet", files["two"])
        assert [n for n in os.listdir(run_tmp) if n.startswith("throttler-run-")] == []  # its private queue
        wait_for(lambda: not group_members(command.pid), 15)  # the embedded workers too
    finally:
        command.kill_group()


@pytest.mark.parametrize("case, expected", [
    ("missing data root", "data root {tmp}/nowhere does not exist or is not a directory"),
    ("output under a file", "output {tmp}/a-file/out does not exist and cannot be created: Not a directory"),
    ("bad group name", "invalid group ID '../up': allowed are letters, digits, '.', '_', '-', starting with a "
                       "letter or digit, no '..'"),
    ("missing manifest", "manifest {tmp}/no.csv does not exist or is not readable"),
])
def test_run_refuses_bad_inputs_before_starting_a_cluster(estate, tmp_path, case, expected):
    root, _ = estate
    (tmp_path / "a-file").write_text("x")
    args = {"missing data root": ["wide", "--data-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")],
            "output under a file": ["wide", "--data-root", str(root), "--output", str(tmp_path / "a-file" / "out")],
            "bad group name": ["../up", "--data-root", str(root), "--output", str(tmp_path / "o")],
            "missing manifest": ["wide", "--data-root", str(root), "--output", str(tmp_path / "o"),
                                 "--manifest", str(tmp_path / "no.csv")]}[case]
    done = throttler_cli("run", *args, timeout_seconds=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == "throttler: " + expected.format(tmp=tmp_path), done.stderr
    assert "distributed" not in done.stderr and not done.stdout  # nothing started


def test_run_with_an_unknown_strategy_is_a_usage_error(estate, tmp_path):
    root, _ = estate
    done = throttler_cli("run", "wide", "--data-root", str(root), "--output", str(tmp_path), "--strategy", "fast")
    assert done.returncode == 2 and "invalid choice: 'fast'" in done.stderr, done.stderr


@pytest.mark.parametrize("missing", ["data root", "output"])
def test_serve_refuses_a_missing_data_root_or_output(tmp_path, missing):
    (tmp_path / "data").mkdir()
    (tmp_path / "out").mkdir()
    gone = {"data root": tmp_path / "data", "output": tmp_path / "out"}[missing]
    gone.rmdir()
    done = throttler_cli("serve", "--spool", str(tmp_path / "spool"), "--data-root", str(tmp_path / "data"),
                         "--output", str(tmp_path / "out"), "--metrics-address", "", timeout_seconds=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"throttler: {missing} {gone} does not exist or is not a directory"
    assert not (tmp_path / "spool").exists()  # refused before anything was made

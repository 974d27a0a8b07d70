"""The dead-daemon verdict of ``throttler status`` (pure) and the progress line of ``run``."""

from __future__ import annotations

import os

from throttler.commands.progress_display import progress_line
from throttler.ops import liveness

NOW = 1_000_000.0


def status(**kw):
    return {"pid": 4242, "pid_start_ticks": 777, "updated_unix_seconds": NOW - 2, **kw}


def test_a_fresh_status_of_a_live_process_started_at_that_time_is_running():
    assert liveness.judge(status(), NOW, 777) == liveness.Liveness(True, "")


def test_a_gone_pid_a_reused_pid_and_a_stale_status_are_not_running():
    assert liveness.judge(status(), NOW, None) == liveness.Liveness(False, "its pid 4242 is gone")
    assert liveness.judge(status(), NOW, 778) == liveness.Liveness(
        False, "its pid 4242 now belongs to another process")
    assert liveness.judge(status(updated_unix_seconds=NOW - 16), NOW, 777) == liveness.Liveness(
        False, "its status is 16 s old (it is rewritten every second)")
    assert liveness.judge(None, NOW, None).reason == "no status file: the daemon has not run with this spool"


def test_this_process_reads_its_own_start_time():
    ticks = liveness.own_start_ticks()
    assert ticks is not None and liveness.process_start_ticks(os.getpid()) == ticks


def test_progress_line_has_files_bytes_rate_and_time_left():
    group = {"group": "g", "files_done": 3, "files_total": 12, "bytes_done": 150 * 2**20,
             "bytes_total": 600 * 2**20, "running_seconds": 3.0, "strategy": "sum"}
    assert progress_line(group) == ("progress g: 3/12 files, 150.0 MiB of 600.0 MiB, 50.0 MiB/s, "
                                    "about 9 s left, running 3 s (sum)")

"""The status file while ``serve`` starts: this process, what it waits for, kept fresh."""

from __future__ import annotations

import os
import time

from tests.conftest import wait_for
from throttler.commands.status import status_document, status_lines
from throttler.ops.status import REFRESH_SECONDS, StartingStatus, read_status
from throttler.spool.queue import Spool


def test_a_starting_daemon_is_reported_running_and_what_it_waits_for(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    with StartingStatus(spool.state_dir, "connecting to scheduler tcp://sched:8786") as starting:
        first = read_status(spool.state_dir)
        assert first["pid"] == os.getpid() and first["starting"] == {
            "waiting_for": "connecting to scheduler tcp://sched:8786",
            "since_unix_seconds": starting.since_unix_seconds}
        wait_for(lambda: read_status(spool.state_dir)["updated_unix_seconds"] > first["updated_unix_seconds"],
                 5 * REFRESH_SECONDS)  # rewritten while it waits
        doc = status_document(str(tmp_path / "spool"), time.time())
        assert doc["running"] is True and doc["not_running_reason"] is None
        lines = status_lines(doc, starting.since_unix_seconds + 42.4)
        assert lines == ["queue: incoming 0  active 0  done 0  failed 0",
                         f"daemon pid {os.getpid()}: starting, connecting to scheduler tcp://sched:8786 for 42 s"]
    stopped_at = read_status(spool.state_dir)["updated_unix_seconds"]
    time.sleep(2.5 * REFRESH_SECONDS)
    assert read_status(spool.state_dir)["updated_unix_seconds"] == stopped_at  # its thread ended with it

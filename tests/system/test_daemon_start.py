"""``throttler serve`` refusing to start where it would harm a running daemon: its spool already
served, its metrics port taken. Real daemon processes on an embedded cluster."""

from __future__ import annotations

import socket

from tests.conftest import wait_for
from tests.helpers.daemon import Daemon, make_estate, records, serve_args, throttler_cli
from tests.helpers.datafiles import assert_matches_reference


def test_a_second_daemon_on_the_same_spool_is_refused_before_it_touches_anything(tmp_path):
    estate = make_estate(tmp_path / "data", {"g1": 2})
    first = Daemon(serve_args(tmp_path, None, "--workers", "1"), tmp_path / "first.log")
    try:
        first.wait_ready(120)
        second = throttler_cli("serve", *serve_args(tmp_path, None, "--workers", "1"), timeout_seconds=60)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"throttler: spool {tmp_path / 'spool'} is in use by another throttler serve (pid {first.pid}): "
            "stop it first, or give this daemon a spool of its own")
        assert "spool recovered" not in second.stderr and "embedded cluster" not in second.stderr
        # the first one serves on, undisturbed
        assert throttler_cli("submit", "g1", "--spool", str(tmp_path / "spool")).returncode == 0
        wait_for(lambda: records(tmp_path / "spool", "done"), 120)
        assert [r["group"] for r in records(tmp_path / "spool", "done")] == ["g1"]
        assert_matches_reference(tmp_path / "out" / "g1.parquet", estate["g1"])
        code, _ = first.stop(60)
        assert code == 0, first.log()
    finally:
        first.kill()


def test_a_metrics_port_in_use_refuses_the_start_in_one_line_before_recovery(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in serve_args(tmp_path, None)]
        done = throttler_cli("serve", *args, timeout_seconds=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"throttler: cannot serve metrics on 127.0.0.1:{port}: Address already in use (another process listens "
        "there? set metrics_address, or an empty one to disable)")
    assert "Traceback" not in done.stderr and "spool recovered" not in done.stderr

"""The real daemon scraped by a real Prometheus: every dashboard query and alert rule
evaluates against what ``throttler serve`` exports while it processes groups."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from tests.helpers.prom import dashboard_queries, http_get, prometheus_server, query, wait_for

from tests.helpers.daemon import (
    Daemon,
    make_estate,
    records,
    serve_args,
    throttler_cli,
    wait_closed,
)

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "alerts.yml"


def test_dashboard_queries_return_data_from_the_running_daemon(tmp_path):
    make_estate(tmp_path / "data", {"a1": 3, "a2": 2, "a3": 4})
    (tmp_path / "data" / "empty").mkdir()
    daemon = Daemon(serve_args(tmp_path, None, "--workers", "1", "--worker-memory-bytes", "1000000000"),
                    tmp_path / "daemon.log")
    try:
        daemon.wait_ready(90)
        target = urllib.parse.urlsplit(daemon.metrics_url()).netloc
        (tmp_path / "prom").mkdir()
        with prometheus_server(tmp_path / "prom", target, rule_files=(ALERTS,)) as prom:
            assert throttler_cli("submit", "a1", "a2", "a3", "empty", "--spool", str(tmp_path / "spool")).returncode == 0
            wait_closed(tmp_path / "spool", 4, 120, daemon)
            assert len(records(tmp_path / "spool", "done")) == 3
            wait_for(lambda: _finished(prom) >= 4, 30, "Prometheus to scrape the finished groups")
            wait_for(lambda: not _empty_queries(prom), 30, "every dashboard query to return data")
            rules = json.loads(http_get(f"{prom}/api/v1/rules"))["data"]["groups"]
            health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
            assert health and all(h == "ok" for h in health.values()), health
    finally:
        code, _ = daemon.stop(60)
    assert code == 0, daemon.log()


def _finished(prom: str) -> float:
    result = query(prom, "sum(throttler_groups_finished_total)")
    return float(result[0]["value"][1]) if result else 0.0


def _empty_queries(prom: str) -> list[str]:
    return [expr for expr in dashboard_queries() if not query(prom, expr)]

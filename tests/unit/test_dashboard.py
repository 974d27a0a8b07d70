"""Grafana dashboard: statically consistent with Metrics, and every query answers in real Prometheus."""

from __future__ import annotations

import json

import pytest
import yaml
from tests.helpers.prom import (
    ALERTS,
    DASHBOARD,
    REPO,
    _panels,
    dashboard_queries,
    exercise,
    exposed_names,
    http_get,
    metric_names,
    prometheus_server,
    query,
    wait_for,
)

from throttler.ops.metrics import Metrics

DATASOURCE = "${datasource}"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels() -> list[dict]:
    return [p for p in _panels(dashboard()["panels"]) if p["type"] != "row"]


def test_metric_names_parser():
    expr = ('histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{x="rate(b)", y=~"$i"}[5m] offset 1h)))'
            ' / on(instance) group_left(version) c_info and 1e3 > bool d')
    assert metric_names(expr) == {"a_bucket", "c_info", "d"}


def test_dashboard_reads_only_exposed_metrics():
    m = Metrics()
    exercise(m)
    known = exposed_names(m.registry)
    used = set()
    for expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} reads unknown {names - known}"
        used |= names
    # Every family of Metrics appears on the dashboard (histograms via any series).
    families = {f.name for f in m.registry.collect()}
    assert not {f for f in families if not any(u.startswith(f) for u in used)}


def test_every_panel_has_a_unit_and_uses_the_datasource_variable():
    panels = data_panels()
    assert len(panels) >= 15
    for panel in panels:
        title = panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, title
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, title


def test_datasource_variable_and_unique_ids():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == DATASOURCE
    ids = [p["id"] for p in _panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids))


def test_provisioning_points_at_the_dashboard():
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/throttler.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    sources = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


@pytest.fixture(scope="module")
def scraped_metrics(tmp_path_factory):
    """A Metrics endpoint with every series set, scraped by a real Prometheus; yields its URL."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    m = Metrics()
    exercise(m, step=1)
    server, _, port = m.serve("127.0.0.1:0")
    try:
        with prometheus_server(tmp_path, f"127.0.0.1:{port}", rule_files=(ALERTS,)) as url:
            wait_for(lambda: query(url, 'up{job="throttler"} == 1'), 30, "a successful scrape")
            exercise(m, step=2)  # counters move between scrapes, so rate() is not 0
            wait_for(lambda: query(url, "count_over_time(throttler_requests_received_total[1m]) >= 3"),
                     30, "three scrapes")
            yield m, url
    finally:
        server.shutdown()
        server.server_close()


def test_every_dashboard_query_returns_data_from_prometheus(scraped_metrics):
    m, url = scraped_metrics
    assert not query(url, "throttler_no_such_metric")  # "no data" is detectable
    empty = [expr for expr in dashboard_queries() if not query(url, expr)]
    assert not empty, f"queries without data: {empty}"
    # Values go through unchanged: two exercises = two requests received.
    (received,) = query(url, "throttler_requests_received_total")
    assert float(received["value"][1]) == 2
    assert query(url, "sum(rate(throttler_requests_received_total[1m])) > 0")


def test_alert_rules_load_and_evaluate(scraped_metrics):
    """Prometheus loads deploy/alerts.yml and evaluates every rule without error."""
    _, url = scraped_metrics

    def all_evaluated() -> list[dict]:
        rules = _rules(url)  # never evaluated: lastEvaluation is year 0001
        return rules if all(not r["lastEvaluation"].startswith("0001") for r in rules) else []

    evaluated = wait_for(all_evaluated, 15, "every rule evaluated")
    assert len(evaluated) == 8
    assert all(r["health"] == "ok" for r in evaluated), evaluated


def _rules(url: str) -> list[dict]:
    groups = json.loads(http_get(f"{url}/api/v1/rules"))["data"]["groups"]
    return [r for g in groups for r in g["rules"]]

"""deploy/alerts.yml: promtool accepts it, its unit tests pass and can fail, it reads real metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from tests.helpers.prom import ALERTS, exercise, exposed_names, metric_names

from throttler.ops.metrics import Metrics

TESTS = Path(__file__).resolve().parent
ALERT_TESTS = TESTS / "alerts_test.yml"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install prometheus"  # fail, never skip
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_check_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested():
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert {rule["alert"] for rule in rules()} <= tested


def test_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests are not vacuous: loosening a threshold makes them fail."""
    broken = ALERTS.read_text().replace("time() - throttler_last_loop_timestamp_seconds > 120",
                                        "time() - throttler_last_loop_timestamp_seconds > 1200")
    assert broken != ALERTS.read_text()
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "alerts.yml").write_text(broken)
    (tmp_path / "tests" / "system").mkdir(parents=True)
    shutil.copy(ALERT_TESTS, tmp_path / "tests" / "system" / "alerts_test.yml")
    result = promtool("test", "rules", "tests/system/alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "ThrottlerLoopStalled" in result.stdout + result.stderr


def test_rules_read_only_exposed_metrics():
    m = Metrics()
    exercise(m)
    known = exposed_names(m.registry) | {"up"}  # up: Prometheus's own scrape health
    for rule in rules():
        assert metric_names(rule["expr"]) <= known, rule["alert"]

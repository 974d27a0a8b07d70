"""Helpers to check throttler's metrics, dashboard and alerts against real Prometheus.

* :func:`exercise` calls every :class:`~throttler.ops.metrics.Metrics` method once,
  so every series exists with a non-zero value.
* :func:`dashboard_queries` lists the PromQL of every dashboard panel, with
  Grafana's variables replaced so Prometheus can evaluate it.
* :func:`metric_names` extracts the metric names a PromQL expression reads.
* :func:`prometheus_server` runs ``/usr/bin/prometheus`` on a free loopback
  port scraping one target every second, and yields its base URL.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

PROMETHEUS = "/usr/bin/prometheus"
REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "throttler.json"
ALERTS = REPO / "deploy" / "alerts.yml"


def exercise(metrics, step: int = 1) -> None:
    """Call every Metrics method with plausible values (``step`` varies gauges)."""
    metrics.set_up({"version": "0.1.0"})
    metrics.heartbeat()
    metrics.request_received()
    metrics.request_rejected("symlink")
    for strategy in ("aligned", "sum", "groupby"):
        metrics.group_finished("done", strategy, 12.5, 10, 504_000_000, 6_000_000)
        metrics.estimate_observed(strategy, 400 * 2**20, 520 * 2**20)
    metrics.group_finished("failed", "groupby", 3.0, 2, 100, 0)
    metrics.group_failed_reason("killed_worker")
    metrics.retry("killed_worker")
    metrics.set_group_states({"queued": 3 + step, "planning": 1, "waiting": 2, "running": 1})
    metrics.set_queue_depth(incoming=5 + step, active=2)
    metrics.admission_wait(2.5)
    metrics.set_reserved_bytes(3 * 2**30)
    metrics.set_cluster_memory(8 * 2**30, 5 * 2**30, 3 * 2**30)
    metrics.set_workers({"running": 2, "paused": step % 2})
    metrics.worker_lost()
    metrics.set_workers_incompatible(step % 2)
    metrics.worker_peak("aligned", 0.5 + 0.1 * step)
    metrics.set_pool("builder", busy=1, size=2)
    metrics.set_pool("submitter", busy=2, size=2)


def exposed_names(registry) -> set[str]:
    """Every sample name in ``registry`` (``_bucket``, ``_sum``, ``_count`` included)."""
    return {s.name for family in registry.collect() for s in family.samples}


#: Grafana variables and what Prometheus gets instead.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".+",
}


def dashboard_queries(path: Path | str = DASHBOARD, variables: dict[str, str] | None = None) -> list[str]:
    """The ``expr`` of every panel target, Grafana variables substituted.

    Rows' nested panels (collapsed rows) are included.
    """
    values = {**GRAFANA_VARIABLES, **(variables or {})}
    queries = []
    for panel in _panels(json.loads(Path(path).read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):  # $__range before $__r...
                expr = expr.replace("${" + name[1:] + "}", values[name]).replace(name, values[name])
            queries.append(expr)
    return queries


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


#: PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression.

    Strips strings, label matchers, ranges and grouping clauses, then keeps
    identifiers that are not followed by ``(`` (functions, aggregations) and
    are not keywords or parts of numbers.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", expr)
    return {n for n in names if n.lower() not in PROMQL_KEYWORDS}


def free_port() -> int:
    """A loopback TCP port free at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def query(base_url: str, expr: str) -> list[dict]:
    """Evaluate an instant query; returns the result vector (raises on API error)."""
    body = json.loads(http_get(f"{base_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {body}")
    return body["data"]["result"]


def wait_for(predicate, timeout_seconds: float, what: str, interval_seconds: float = 0.25):
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout_seconds
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # not ready yet: connection refused, no data
            last_error = exc
        time.sleep(interval_seconds)
    raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what} (last error: {last_error!r})")


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, scrape_target: str, rule_files: tuple[Path, ...] = (),
                      ready_timeout_seconds: float = 60.0) -> Iterator[str]:
    """Run Prometheus scraping ``scrape_target`` ("127.0.0.1:PORT", job "throttler") every 1 s.

    Storage lives in ``tmp_path``; yields the base URL once ``/-/ready``
    answers, and terminates the server on exit. Its log is ``tmp_path /
    "prometheus.log"`` and is quoted if it does not come up.
    """
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "throttler", "static_configs": [{"targets": [scrape_target]}]}],
    }))
    base_url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={base_url.removeprefix('http://')}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, base_url, ready_timeout_seconds, log_path)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout_seconds: float, log_path: Path) -> None:
    """Return when ``/-/ready`` answers 200; fail at once if the process died."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        if proc.poll() is not None:
            problem = f"prometheus exited with status {proc.returncode}"
        elif time.monotonic() > deadline:
            problem = f"prometheus not ready after {timeout_seconds} s"
        else:
            with contextlib.suppress(OSError):
                http_get(f"{base_url}/-/ready", timeout=1)
                return
            time.sleep(0.25)
            continue
        raise AssertionError(f"{problem}; log:\n{log_path.read_text()[-3000:]}")

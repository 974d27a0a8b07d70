"""Metrics: every method updates its series, garbage never raises, the endpoint serves.

Each test gets a fresh :class:`Metrics` (its own registry); the endpoint binds
port 0; the exposition is linted by the real ``promtool``.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import subprocess
import time

import pytest
from tests.helpers.prom import exercise, http_get
from prometheus_client import generate_latest

from throttler.ops import metrics as metrics_module
from throttler.ops.metrics import DEFAULT_ADDRESS, Metrics, parse_address

MiB = 2**20


@pytest.fixture
def m() -> Metrics:
    return Metrics()


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_requests(m):
    m.request_received()
    m.request_received()
    m.request_rejected("symlink")
    m.request_rejected("weird-new-reason")
    assert value(m, "throttler_requests_received_total") == 2
    assert value(m, "throttler_requests_rejected_total", reason="symlink") == 1
    assert value(m, "throttler_requests_rejected_total", reason="other") == 1
    assert value(m, "throttler_requests_rejected_total", reason="weird-new-reason") is None


def test_group_finished(m):
    m.group_finished("done", "aligned", 12.5, files=10, bytes_read=504_000_000, rows=6_000_000)
    m.group_finished("failed", "groupby", 0.5, files=2, bytes_read=100, rows=0)
    assert value(m, "throttler_groups_finished_total", outcome="done", strategy="aligned") == 1
    assert value(m, "throttler_groups_finished_total", outcome="failed", strategy="groupby") == 1
    assert value(m, "throttler_group_run_seconds_count", strategy="aligned") == 1
    assert value(m, "throttler_group_run_seconds_sum", strategy="aligned") == 12.5
    assert value(m, "throttler_group_run_seconds_bucket", strategy="aligned", le="10.0") == 0
    assert value(m, "throttler_group_run_seconds_bucket", strategy="aligned", le="30.0") == 1
    assert value(m, "throttler_files_processed_total") == 12
    assert value(m, "throttler_bytes_processed_total") == 504_000_100
    assert value(m, "throttler_rows_written_total") == 6_000_000


def test_failures_and_retries(m):
    m.group_failed_reason("killed_worker")
    m.group_failed_reason("/data/secret/group-42")  # never a label value
    m.retry("scheduler")
    assert value(m, "throttler_group_failures_total", reason="killed_worker") == 1
    assert value(m, "throttler_group_failures_total", reason="other") == 1
    assert value(m, "throttler_retries_total", reason="scheduler") == 1
    assert "group-42" not in generate_latest(m.registry).decode()


def test_group_states_and_queue(m):
    m.set_group_states({"queued": 4, "running": 2})
    m.set_group_states({"queued": 3, "waiting": 1})  # running absent -> 0
    assert value(m, "throttler_groups", state="queued") == 3
    assert value(m, "throttler_groups", state="waiting") == 1
    assert value(m, "throttler_groups", state="running") == 0
    m.set_queue_depth(incoming=7, active=2)
    assert value(m, "throttler_queue_depth", dir="incoming") == 7
    assert value(m, "throttler_queue_depth", dir="active") == 2


def test_admission_and_memory(m):
    m.admission_wait(0.3)
    m.set_reserved_bytes(3 * 2**30)
    m.set_cluster_memory(limit_bytes=8 * 2**30, used_bytes=5 * 2**30, free_bytes=3 * 2**30)
    assert value(m, "throttler_admission_wait_seconds_count") == 1
    assert value(m, "throttler_admission_wait_seconds_bucket", le="0.5") == 1
    assert value(m, "throttler_memory_reserved_bytes") == 3 * 2**30
    assert value(m, "throttler_cluster_memory_limit_bytes") == 8 * 2**30
    assert value(m, "throttler_cluster_memory_used_bytes") == 5 * 2**30
    assert value(m, "throttler_cluster_memory_free_bytes") == 3 * 2**30


def test_estimate_observed(m):
    m.estimate_observed("sum", 400 * MiB, 600 * MiB)
    assert value(m, "throttler_task_peak_estimated_bytes_sum", strategy="sum") == 400 * MiB
    assert value(m, "throttler_task_peak_observed_bytes_sum", strategy="sum") == 600 * MiB
    assert value(m, "throttler_estimate_ratio_sum", strategy="sum") == 1.5
    assert value(m, "throttler_estimate_ratio_bucket", strategy="sum", le="1.25") == 0
    assert value(m, "throttler_estimate_ratio_bucket", strategy="sum", le="1.5") == 1
    m.estimate_observed("sum", 0, 10 * MiB)  # no estimate: no ratio, peaks still recorded
    assert value(m, "throttler_estimate_ratio_count", strategy="sum") == 1
    assert value(m, "throttler_task_peak_observed_bytes_count", strategy="sum") == 2


def test_worker_peak_fraction(m):
    m.worker_peak("groupby", 0.78)
    m.worker_peak("groupby", 0.83)
    assert value(m, "throttler_worker_peak_fraction_count", strategy="groupby") == 2
    assert value(m, "throttler_worker_peak_fraction_bucket", strategy="groupby", le="0.8") == 1
    assert value(m, "throttler_worker_peak_fraction_bucket", strategy="groupby", le="0.85") == 2
    m.set_workers_incompatible(2)
    assert value(m, "throttler_workers_incompatible") == 2
    m.set_workers_without_memory_limit(3)
    assert value(m, "throttler_workers_without_memory_limit") == 3
    m.set_workers_host_capped(2)
    assert value(m, "throttler_workers_host_capped") == 2


def test_workers_and_losses(m):
    class Status:  # stands in for distributed.core.Status members
        value = "paused"

    m.set_workers({"running": 3, Status(): 1, "closing_gracefully": 1, "init": 2})
    assert value(m, "throttler_workers", status="running") == 3
    assert value(m, "throttler_workers", status="paused") == 1
    assert value(m, "throttler_workers", status="closing") == 1
    assert value(m, "throttler_workers", status="other") == 2
    m.set_workers({"running": 1})
    assert value(m, "throttler_workers", status="paused") == 0
    m.worker_lost()
    assert value(m, "throttler_worker_losses_total") == 1


def test_pools(m):
    m.set_pool("builder", busy=1, size=4)
    m.set_pool("submitter", busy=2, size=2)
    assert value(m, "throttler_pool_busy_threads", pool="builder") == 1
    assert value(m, "throttler_pool_threads", pool="builder") == 4
    assert value(m, "throttler_pool_busy_threads", pool="submitter") == 2


def test_set_up_and_heartbeat(m):
    m.set_up({"version": "9.9.9", "start_time_seconds": 1_700_000_000})
    m.set_up({"version": "9.9.10", "start_time_seconds": 1_700_000_001})  # replaces, not adds
    samples = [s for f in m.registry.collect() for s in f.samples if s.name == "throttler_build_info"]
    assert [(s.labels["version"], s.value) for s in samples] == [("9.9.10", 1.0)]
    assert value(m, "throttler_start_time_seconds") == 1_700_000_001
    before = time.time()
    m.heartbeat()
    assert before <= value(m, "throttler_last_loop_timestamp_seconds") <= time.time()


def test_known_series_start_at_zero(m):
    """Before any event, labelled series exist with 0 (queries return 0, not no data)."""
    for outcome in ("done", "failed"):
        assert value(m, "throttler_groups_finished_total", outcome=outcome, strategy="aligned") == 0
    for state in ("queued", "planning", "waiting", "running"):
        assert value(m, "throttler_groups", state=state) == 0
    for status in ("running", "paused", "closing", "other"):
        assert value(m, "throttler_workers", status=status) == 0
    for pool in ("builder", "submitter"):
        assert value(m, "throttler_pool_threads", pool=pool) == 0
    assert value(m, "throttler_group_failures_total", reason="does_not_fit") == 0
    assert value(m, "throttler_queue_depth", dir="incoming") == 0


def test_no_created_series(m):
    exercise(m)
    assert "_created" not in generate_latest(m.registry).decode()


GARBAGE_CALLS = [
    ("request_rejected", (None,)),
    ("group_finished", ("maybe", "aligned", 1.0, 1, 1, 1)),
    ("group_finished", ("done", "aligned", "slow", 1, 1, 1)),
    ("group_finished", ("done", "aligned", 1.0, -1, 1, 1)),
    ("group_finished", ("done", None, 1.0, 1, None, 1)),
    ("group_failed_reason", (object(),)),
    ("set_group_states", (None,)),
    ("set_group_states", ({"queued": "many"},)),
    ("set_queue_depth", ("x", 1)),
    ("admission_wait", (None,)),
    ("set_reserved_bytes", (-5,)),
    ("set_cluster_memory", ("a", "b", "c")),
    ("set_workers", ([1, 2],)),
    ("set_workers_incompatible", ("some",)),
    ("set_workers_without_memory_limit", (None,)),
    ("set_workers_host_capped", ("two",)),
    ("set_workers_without_data_access", ("some",)),
    ("worker_peak", ("aligned", None)),
    ("worker_peak", ("aligned", -0.5)),
    ("estimate_observed", ("sum", "big", 1)),
    ("estimate_observed", ("sum", -1, 1)),
    ("retry", (12,)),
    ("set_pool", ("mystery", 1, 2)),
    ("set_pool", ("builder", None, 2)),
    ("set_up", (None,)),
]


@pytest.mark.parametrize("method, args", GARBAGE_CALLS, ids=lambda x: repr(x)[:40])
def test_garbage_never_raises(m, method, args):
    getattr(m, method)(*args)  # must not raise


def test_garbage_changes_nothing_and_is_logged(m, caplog):
    """group_finished checks every argument before it counts anything."""
    before = generate_latest(m.registry)
    with caplog.at_level(logging.WARNING, logger="throttler.ops.metrics"):
        m.group_finished("done", "aligned", 1.0, 3, "lots", 7)
    assert generate_latest(m.registry) == before
    assert "group_finished" in caplog.text


def test_library_error_is_swallowed(m, monkeypatch, caplog):
    """Even a failure inside prometheus_client must not reach the caller."""
    def broken(*args, **kwargs):
        raise RuntimeError("registry on fire")

    monkeypatch.setattr(m._losses, "inc", broken)
    with caplog.at_level(logging.WARNING, logger="throttler.ops.metrics"):
        m.worker_lost()
    assert "registry on fire" in caplog.text


def test_every_public_method_is_guarded():
    """A new update method without the guard would break the core path."""
    for name, fn in inspect.getmembers(Metrics, inspect.isfunction):
        if not name.startswith("_") and name != "serve":
            assert fn.__code__.co_name == "wrapper", f"{name} is not wrapped by _never_raises"


def test_parse_address():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address(":0") == ("127.0.0.1", 0)  # no host: loopback, never all interfaces
    with pytest.raises(ValueError):
        parse_address("9464")


def test_serve_defaults_to_loopback(m):
    assert inspect.signature(Metrics.serve).parameters["address"].default == DEFAULT_ADDRESS
    assert DEFAULT_ADDRESS == "127.0.0.1:9464"
    m.request_received()
    server, thread, port = m.serve(":0")
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert port == server.server_address[1] > 0
        assert thread.is_alive()
        body = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        assert "throttler_requests_received_total 1.0" in body
    finally:
        server.shutdown()
        server.server_close()


def test_exposition_passes_promtool(m):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    exercise(m)
    result = subprocess.run([promtool, "check", "metrics"], input=generate_latest(m.registry),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result
    assert result.stdout == b"" and result.stderr == b"", result


def test_module_uses_no_global_registry():
    from prometheus_client import REGISTRY

    Metrics()
    assert not any(n.startswith("throttler_") for n in REGISTRY._names_to_collectors)
    assert "REGISTRY" not in vars(metrics_module)

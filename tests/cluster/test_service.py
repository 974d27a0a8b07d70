"""The daemon's service end to end: real spool, real Parquet files, a real multi-process cluster."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import wait_for
from tests.helpers.datafiles import assert_matches_reference, write_sim
from throttler.cluster.scheduler import read_snapshot
from throttler.config import load
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.planning.footers import file_info
from throttler.planning.planner import make_plan
from throttler.service.service import Service
from throttler.spool.queue import Spool


def make_estate(root, groups: dict[str, int], **kw) -> dict[str, list[str]]:
    out = {}
    for group, n in groups.items():
        os.makedirs(root / group, exist_ok=True)
        out[group] = [write_sim(root / group / f"f{i:03d}.parquet", seed=hash((group, i)) % 1000, **kw)
                      for i in range(n)]
    return out


def make_service(tmp_path, client, **overrides):
    cfg = load(overrides={"spool": str(tmp_path / "spool"), "data_root": str(tmp_path / "data"),
                          "output": str(tmp_path / "out"), "metrics_address": None, "poll_seconds": 0.05,
                          **overrides}, environ={})
    os.makedirs(cfg.output, exist_ok=True)
    spool = Spool(cfg.spool).ensure()
    metrics = Metrics()
    service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, cfg.manifest), metrics=metrics,
                      estimator=Estimator(str(spool.state_dir / "estimator.json")), notifier=sdnotify)
    return service, spool, metrics


def drop_request(spool_root, name, content=b""):
    """A request written by plain file operations, as another program would."""
    tmp = os.path.join(spool_root, "tmp", name)
    with open(tmp, "wb") as fh:
        fh.write(content)
    os.rename(tmp, os.path.join(spool_root, "incoming", name))


def records(spool_root, kind):
    folder = os.path.join(spool_root, kind)
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as fh:
            out.append(json.load(fh))
    return out


def run_service_until_settled(service, spool, expected, timeout_seconds=120):
    service.start()
    try:
        wait_for(lambda: sum(len(r["requests"]) for k in ("done", "failed") for r in records(spool.root, k))
                 >= expected, timeout_seconds, step=service.step)
    finally:
        service.drain(30)


def test_groups_end_to_end_with_records_and_reference(tmp_path, client):
    estate = make_estate(tmp_path / "data", {"alpha": 3, "beta": 7, "gamma": 1})
    service, spool, metrics = make_service(tmp_path, client)
    drop_request(spool.root, "alpha")
    drop_request(spool.root, "req-1.json", json.dumps({"group": "beta", "strategy": "sum", "priority": 5}).encode())
    drop_request(spool.root, "req-2.json", json.dumps({"group": "gamma", "strategy": "groupby"}).encode())
    run_service_until_settled(service, spool, 3)
    done = {r["group"]: r for r in records(spool.root, "done")}
    assert set(done) == {"alpha", "beta", "gamma"} and not records(spool.root, "failed")
    assert (done["alpha"]["strategy"], done["beta"]["strategy"], done["gamma"]["strategy"]) == \
        ("aligned", "sum", "groupby")
    shape = read_snapshot(client).shape()  # the shape the service planned for
    requested = {"alpha": "auto", "beta": "sum", "gamma": "groupby"}
    request_files = {"alpha": "alpha", "beta": "req-1.json", "gamma": "req-2.json"}
    for group, files in estate.items():
        r = done[group]
        assert_matches_reference(r["output"], files)
        # each strategy's correction was still 1.0 when its one group was planned: the same plan again
        plan = make_plan(group, [file_info(f) for f in files], requested[group], shape, Estimator())
        output = str(tmp_path / "out" / f"{group}.parquet")
        assert {k: r[k] for k in ("group", "output", "rows", "files", "bytes", "bytes_written", "nan_count",
                                  "strategy", "requested_strategy", "estimate_bytes", "task_estimate_bytes",
                                  "files_per_task", "leaf_tasks", "attempts", "history", "requests")} == {
            "group": group, "output": output, "rows": 300, "files": len(files),
            "bytes": sum(os.path.getsize(f) for f in files), "bytes_written": os.path.getsize(output),
            "nan_count": 0, "strategy": plan.strategy, "requested_strategy": requested[group],
            "estimate_bytes": plan.group_peak_bytes, "task_estimate_bytes": plan.task_peak_bytes,
            "files_per_task": plan.files_per_task, "leaf_tasks": plan.n_leaf_tasks, "attempts": 1,
            "history": [], "requests": [request_files[group]]}
        assert 0 <= r["admission_wait_seconds"] <= r["total_seconds"] and 0 < r["seconds"] <= r["total_seconds"]
    assert metrics.registry.get_sample_value("throttler_groups_finished_total",
                                             {"outcome": "done", "strategy": "aligned"}) == 1
    assert not os.listdir(os.path.join(spool.root, "incoming"))
    assert not os.listdir(os.path.join(spool.root, "active"))
    assert sorted(os.listdir(tmp_path / "out")) == ["alpha.parquet", "beta.parquet", "gamma.parquet"]


def test_a_finishing_group_shows_all_its_files_read_until_it_leaves_running(tmp_path, client):
    """What ``status`` and ``run``'s progress read while the result is recorded: never back to zero."""
    make_estate(tmp_path / "data", {"delta": 4})
    service, spool, _ = make_service(tmp_path, client)
    seen = []
    finish = spool.finish

    def finish_and_look(claim, kind, record):
        seen.extend((g["group"], g["files_done"], g["files_total"]) for g in service.running_groups())
        return finish(claim, kind, record)

    spool.finish = finish_and_look
    drop_request(spool.root, "delta")
    run_service_until_settled(service, spool, 1)
    assert [r["group"] for r in records(spool.root, "done")] == ["delta"]
    assert seen == [("delta", 4, 4)]


def test_bad_groups_fail_clearly_and_others_are_served(tmp_path, client):
    estate = make_estate(tmp_path / "data", {"good": 2, "badcol": 2})
    pq.write_table(pq.read_table(estate["badcol"][1]).drop_columns(["value"]), estate["badcol"][1])
    service, spool, metrics = make_service(tmp_path, client)
    for name in ("good", "badcol", "missing-group", ".hidden"):
        drop_request(spool.root, name)
    run_service_until_settled(service, spool, 4)
    failed = {r.get("group") or r["request"]: r["reason"] for r in records(spool.root, "failed")}
    assert [r["group"] for r in records(spool.root, "done")] == ["good"]
    assert "missing column(s) value" in failed["badcol"] and "f001.parquet" in failed["badcol"]
    assert "unknown group 'missing-group'" in failed["missing-group"]
    assert any("hidden" in k for k in failed)
    assert metrics.registry.get_sample_value("throttler_group_failures_total", {"reason": "data"}) == 1
    assert metrics.registry.get_sample_value("throttler_group_failures_total", {"reason": "catalog"}) == 1


def _swap_two_keys_keeping_the_layout(directory) -> None:
    """Every file rewritten uncompressed, only Date dictionary-encoded; f002's keys become f000's with two rows swapped:
    the footers show equal key chunk sizes, so only the aligned attempt can find the keys differ."""
    for f in sorted(directory.iterdir()):
        table = pq.read_table(f)
        if f.name == "f002.parquet":
            order = np.arange(table.num_rows)
            order[[3, 40]] = order[[40, 3]]
            keys = pq.read_table(directory / "f000.parquet", columns=["path", "Date"]).take(order)
            table = table.set_column(0, "path", keys.column("path")).set_column(1, "Date", keys.column("Date"))
        pq.write_table(table, f, use_dictionary=["Date"], compression="none")


def test_misaligned_group_falls_back_to_dense_under_auto_and_fails_under_aligned(tmp_path, client):
    estate = make_estate(tmp_path / "data", {"mixed": 3})
    _swap_two_keys_keeping_the_layout(tmp_path / "data" / "mixed")
    shutil.copytree(tmp_path / "data" / "mixed", tmp_path / "data" / "strict")
    service, spool, _ = make_service(tmp_path, client)
    drop_request(spool.root, "mixed")
    drop_request(spool.root, "strict.json", json.dumps({"group": "strict", "strategy": "aligned"}).encode())
    run_service_until_settled(service, spool, 2)
    (done,) = records(spool.root, "done")
    assert done["group"] == "mixed" and done["strategy"] == "dense" and "not aligned" in done["history"][0]
    assert_matches_reference(done["output"], estate["mixed"])
    (failed,) = records(spool.root, "failed")
    assert failed["group"] == "strict" and "keys" in failed["reason"] and "f002.parquet" in failed["reason"]
    assert not os.path.exists(tmp_path / "out" / "strict.parquet")


def test_same_group_requested_many_times_runs_once(tmp_path, client):
    make_estate(tmp_path / "data", {"dup": 2})
    service, spool, _ = make_service(tmp_path, client)
    for i in range(50):
        spool.submit("dup")
    run_service_until_settled(service, spool, 50)
    (done,) = records(spool.root, "done")
    assert len(done["requests"]) == 50 and done["coalesced"] == 49


class FlakyCatalog:
    """A catalog on storage that fails with EIO: every call raises."""

    def __init__(self):
        self.calls = 0

    def files(self, group):
        self.calls += 1
        raise OSError(5, "Input/output error")


def test_transient_planning_failures_wait_out_the_backoff(tmp_path, client):
    service, spool, metrics = make_service(tmp_path, client, max_transient_attempts=3)
    service.catalog = FlakyCatalog()
    spool.submit("g")
    service.start()
    try:
        wait_for(lambda: service.catalog.calls >= 1, 10, step=service.step)
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            service.step()
            time.sleep(0.02)
        assert service.catalog.calls == 1  # the retry waits for its backoff (>= 1 s), not an instant loop
        wait_for(lambda: records(spool.root, "failed"), 60, step=service.step)
    finally:
        service.drain(10)
    (failed,) = records(spool.root, "failed")
    assert service.catalog.calls == 3 and failed["attempts"] == 3
    assert "Input/output error" in failed["reason"] and len(failed["history"]) == 3
    assert metrics.registry.get_sample_value("throttler_retries_total", {"reason": "io"}) == 2


def test_requests_without_a_strategy_take_the_configured_default(tmp_path, client):
    estate = make_estate(tmp_path / "data", {"plain": 2, "json": 2, "explicit": 2})
    service, spool, _ = make_service(tmp_path, client, strategy="groupby")
    drop_request(spool.root, "plain")
    drop_request(spool.root, "r.json", json.dumps({"group": "json"}).encode())
    spool.submit("explicit", strategy="sum")
    run_service_until_settled(service, spool, 3)
    done = {r["group"]: r["strategy"] for r in records(spool.root, "done")}
    assert done == {"plain": "groupby", "json": "groupby", "explicit": "sum"}
    for group, files in estate.items():
        assert_matches_reference(tmp_path / "out" / f"{group}.parquet", files)


def _our_memory_resources(client) -> dict[str, float]:
    return client.run_on_scheduler(lambda dask_scheduler: {
        a: ws.resources.get("throttler-memory-bytes", 0.0) for a, ws in dask_scheduler.workers.items()})


def test_a_daemon_gives_back_the_workers_a_daemon_before_it_withdrew(tmp_path, client):
    """The first service's data root is missing on every worker: it withdraws them all. The plugin keeps
    that state in the workers; the next service, whose workers can reach its root, gives them back."""
    blind, _, _ = make_service(tmp_path / "first", client, data_root=str(tmp_path / "first" / "no-such-root"))
    blind.start()
    try:
        n_workers = len(client.scheduler_info()["workers"])
        wait_for(lambda: len(blind.status.workers_without_data_access()) == n_workers, 30, step=blind.step)
        wait_for(lambda: set(_our_memory_resources(client).values()) == {0.0}, 10)
        assert blind.status.cluster_memory()["limit_bytes"] == 0  # admission counts none of them
    finally:
        blind.drain(10)
    reasons = client.run(lambda dask_worker: dask_worker.plugins["throttler-memory"].withdrawn)
    assert len(reasons) == n_workers and all(r.startswith("cannot read the data root ") for r in reasons.values())

    estate = make_estate(tmp_path / "second" / "data", {"back": 3})
    service, spool, _ = make_service(tmp_path / "second", client)
    drop_request(spool.root, "back")
    run_service_until_settled(service, spool, 1, timeout_seconds=60)
    assert [r["group"] for r in records(spool.root, "done")] == ["back"]
    assert min(_our_memory_resources(client).values()) > 0
    assert_matches_reference(tmp_path / "second" / "out" / "back.parquet", estate["back"])

"""``throttler demo``: a small estate processed end to end by the real daemon.

Generates a sample estate, starts an embedded local Dask cluster, queues every
group (plus one unknown group, to show a failure record) through the spool,
runs the service until each request has a record, checks every output against
an independent pandas group-by, and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pandas as pd
import pyarrow.parquet as pq

from throttler.cluster.embedded import start_embedded_cluster
from throttler.commands.generate import EstateSpec, write_estate
from throttler.config import load
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.service.service import Service
from throttler.spool.queue import Spool

DEMO_SPEC = EstateSpec(groups=6, max_files=24, paths=2_000, dates=24, seed=42)
DEMO_TIMEOUT_SECONDS = 300


def run_demo(directory: str, groups: int) -> int:
    shutil.rmtree(directory, ignore_errors=True)
    data, spool_dir, output = (os.path.join(directory, d) for d in ("data", "spool", "output"))
    estate = write_estate(data, EstateSpec(**{**DEMO_SPEC.__dict__, "groups": groups}))
    print(f"generated {len(estate)} groups ({sum(map(len, estate.values()))} files) under {data}")
    cfg = load(overrides={"spool": spool_dir, "data_root": data, "output": output, "metrics_address": None},
               environ={})
    os.makedirs(output, exist_ok=True)
    spool = Spool(spool_dir).ensure()
    for group in list(estate) + ["no-such-group"]:
        spool.submit(group)
    cluster, client = start_embedded_cluster(memory_limit_bytes=2**30, n_workers=2)
    service = Service(cfg, client, spool=spool, catalog=Catalog(data), metrics=Metrics(),
                      estimator=Estimator(str(spool.state_dir / "estimator.json")), notifier=sdnotify)
    try:
        _process(service, spool, len(estate) + 1)
    finally:
        service.drain(30)
        client.close()
        cluster.close()
    return _report(spool_dir, data, estate)


def _process(service: Service, spool: Spool, expected: int) -> None:
    service.start()
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        service.step()
        counts = spool.counts()
        if counts["done"] + counts["failed"] >= expected:
            return
        time.sleep(0.1)
    raise TimeoutError("demo did not finish in time")


def _report(spool_dir: str, data: str, estate: dict) -> int:
    records = []
    for kind in ("done", "failed"):
        for name in sorted(os.listdir(os.path.join(spool_dir, kind))):
            with open(os.path.join(spool_dir, kind, name)) as fh:
                records.append((kind, json.load(fh)))
    print(f"\n{'group':<15}{'outcome':<9}{'files':>6}{'rows':>9}{'strategy':>10}{'est MiB':>9}"
          f"{'obs MiB':>9}{'worker peak':>12}{'seconds':>9}  check")
    bad = 0
    for kind, r in sorted(records, key=lambda kr: kr[1].get("group") or ""):
        if kind == "failed":
            print(f"{r.get('group') or '?':<15}{'failed':<9}  reason: {r['reason']}")
            bad += r.get("group") in estate
            continue
        ok = _matches_reference(r["output"], [os.path.join(data, f) for f in estate[r["group"]]])
        bad += not ok
        print(f"{r['group']:<15}{'done':<9}{r['files']:>6}{r['rows']:>9}{r['strategy']:>10}"
              f"{r['estimate_bytes'] / 2**20:>9.1f}{r['observed_peak_bytes'] / 2**20:>9.1f}"
              f"{_percent(r.get('worker_peak_fraction')):>12}{r['seconds']:>9.2f}  {'equals pandas groupby' if ok else 'MISMATCH'}")
    print("\nall outputs verified" if not bad else f"\n{bad} problem(s)")
    return 1 if bad else 0


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def _matches_reference(output: str, files: list[str]) -> bool:
    frames = [pq.read_table(f).to_pandas() for f in files]
    want = pd.concat(frames).groupby(["path", "Date"])["value"].sum().reset_index()
    got = pq.read_table(output).to_pandas()
    if len(got) != len(want):
        return False
    same_keys = (got["path"].to_numpy() == want["path"].to_numpy()).all() and \
        (pd.to_datetime(got["Date"]).to_numpy() == pd.to_datetime(want["Date"]).to_numpy()).all()
    close = ((got["value"] - want["value"]).abs() <= 1e-9 * (1 + want["value"].abs())).all()
    return bool(same_keys and close)

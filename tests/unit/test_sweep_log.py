"""The end-of-run sweep tells an incremental run's own copy of the previous output from what killed attempts left.

An incremental run reads its previous output through a private hard link (a
temporary name beside the output); the sweep removes it with the group's other
temporaries, but only temporaries left by killed attempts are reported.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pyarrow as pa

from tests.helpers.datafiles import write_sim
from throttler.config import load
from throttler.ops import sdnotify
from throttler.ops.metrics import Metrics
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.service import incremental_run
from throttler.service.jobs import Job
from throttler.service.service import Service
from throttler.spool.queue import Spool
from throttler.worker.output import output_table, write_table

OWN_COPY = ".g.parquet.0123456789ab.tmp"
KILLED_WRITE = ".g.parquet.ba9876543210.tmp"


def make_service(tmp_path) -> Service:
    cfg = load(overrides={"spool": str(tmp_path / "spool"), "data_root": str(tmp_path), "output": str(tmp_path / "out"),
                          "metrics_address": None}, environ={})
    os.makedirs(cfg.output)
    return Service(cfg, client=None, spool=Spool(cfg.spool).ensure(), catalog=Catalog(cfg.data_root, None),
                   metrics=Metrics(), estimator=Estimator(str(tmp_path / "estimator.json")), notifier=sdnotify)


def job_with_copy(name: str) -> Job:
    job = Job(claim=None, group="g", requested_strategy="sum", priority=0, claimed_at_seconds=0.0)
    job.snapshot_names.add(name)
    return job


def sweep_messages(service: Service, job: Job, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="throttler.service.service"):
        service._sweep(job)
    return [r.getMessage() for r in caplog.records if "temporary output" in r.getMessage()]


def test_the_runs_own_copy_is_swept_without_a_word(tmp_path, caplog):
    service = make_service(tmp_path)
    (tmp_path / "out" / OWN_COPY).write_bytes(b"previous output")
    assert sweep_messages(service, job_with_copy(OWN_COPY), caplog) == []
    assert os.listdir(tmp_path / "out") == []


def test_only_what_killed_attempts_left_is_reported(tmp_path, caplog):
    service = make_service(tmp_path)
    for name in (OWN_COPY, KILLED_WRITE):
        (tmp_path / "out" / name).write_bytes(b"x")
    assert sweep_messages(service, job_with_copy(OWN_COPY), caplog) == [
        "g: removed 1 temporary output(s) left by killed attempts"]
    assert os.listdir(tmp_path / "out") == []


def test_an_incremental_run_names_its_copy_of_the_previous_output(tmp_path):
    (tmp_path / "data" / "g").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    first = write_sim(tmp_path / "data" / "g" / "f00.parquet", seed=1)
    output = str(tmp_path / "out" / "g.parquet")
    full = incremental_run.prepare([first], str(tmp_path / "data"), output, False)
    assert (full.decision.kind, full.snapshot) == ("full", None)
    write_table(full.target, output_table(pa.array([1]), pa.array([np.datetime64("2020-01-01", "ns")]),
                                          np.array([2.0])))

    second = write_sim(tmp_path / "data" / "g" / "f01.parquet", seed=2)
    extended = incremental_run.prepare([first, second], str(tmp_path / "data"), output, False)
    assert extended.decision.kind == "incremental"
    assert re.fullmatch(r"\.g\.parquet\.[0-9a-f]{12}\.tmp", os.path.basename(extended.snapshot))
    assert os.path.samefile(extended.snapshot, output) and extended.files[-1].path == extended.snapshot

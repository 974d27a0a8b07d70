"""``throttler run``: aggregate some groups now, then exit (for Argo, cron, scripts).

The groups go through the daemon's own service over a private, temporary queue
directory: the same planning, admission, submission, retries and fall-back as
``throttler serve``, so groups that fit together run together and a group
larger than the cluster runs in chunks. Each group's line is printed when it
ends; progress (files and bytes read) goes to stderr.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field

from throttler.commands.progress_display import ProgressDisplay
from throttler.config import Config
from throttler.ops.metrics import Metrics
from throttler.planning.catalog import Catalog
from throttler.planning.estimator import Estimator
from throttler.service.service import Service
from throttler.spool.queue import Spool

log = logging.getLogger(__name__)

#: How long ``run`` waits for in-flight groups when it is interrupted.
DRAIN_SECONDS = 30.0


@dataclass
class RunResults:
    """Records of the groups that ended, in the order they ended."""

    expected: int
    records: list[tuple[str, dict]] = field(default_factory=list)
    changed: threading.Event = field(default_factory=threading.Event)

    def add(self, kind: str, record: dict) -> None:
        self.records.append((kind, record))
        self.changed.set()

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.expected

    @property
    def failed(self) -> int:
        return sum(1 for kind, _ in self.records if kind != "done")


def result_line(kind: str, record: dict) -> str:
    """One line per group, as ``throttler run`` prints it."""
    if kind != "done":
        return f"FAILED {record['group']}: {record['reason']}"
    if record.get("run_kind") == "unchanged":
        return (f"ok     {record['group']}: {record['rows']:,} rows from {record['files']} files (unchanged: "
                f"no file new or changed, 0 files read, output untouched) -> {record['output']}")
    fraction = record.get("worker_peak_fraction")
    peak = "" if fraction is None else f", worker peak {fraction:.0%} of its limit"
    strategy = record["strategy"]
    if record.get("fell_back"):
        strategy += " (keys not aligned)"
    return (f"ok     {record['group']}: {record['rows']:,} rows from {record['files']} files in "
            f"{record['seconds']:.2f} s ({strategy}, {run_note(record)}, {record['bytes'] / 2**20:,.1f} MiB read, "
            f"{record['nan_count']} NaN{peak}) -> {record['output']}")


def run_note(record: dict) -> str:
    """``incremental: 1 file read`` or ``full (why): N files read``."""
    if "run_kind" not in record:
        return f"{record['files']} files read"
    why = "" if record["run_kind"] == "incremental" else f" ({record['run_reason']})"
    read = record["files_read"]
    return f"{record['run_kind']}{why}: {read} file{'' if read == 1 else 's'} read"


def run_groups(cfg: Config, client, groups: list[str], strategy: str, display: ProgressDisplay,
               print_line=print, full: bool = False) -> RunResults:
    """Run ``groups`` through a service on ``client``; print a line as each ends."""
    unique = list(dict.fromkeys(groups))
    with tempfile.TemporaryDirectory(prefix="throttler-run-") as spool_dir:
        spool = Spool(spool_dir).ensure()
        results = RunResults(len(unique))
        for group in unique:
            spool.submit(group, strategy=strategy, full=full)
        service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, cfg.manifest),
                          estimator=Estimator(), metrics=Metrics(), notifier=None)
        service.on_finished = results.add
        try:
            service.start()
            _serve_until_done(service, results, display, print_line)
        finally:
            display.close()
            service.drain(DRAIN_SECONDS)
    return results


def _serve_until_done(service: Service, results: RunResults, display: ProgressDisplay, print_line) -> None:
    printed = 0
    while True:
        service.step()
        while printed < len(results.records):
            display.clear()
            print_line(result_line(*results.records[printed]))
            printed += 1
        if results.complete:
            return
        display.update(service.running_groups(), time.monotonic())
        results.changed.wait(0.25)
        results.changed.clear()

"""``throttler run``: aggregate some groups now, then exit (for Argo, cron, scripts).

The groups go through the daemon's own service over a private, temporary queue
directory: the same planning, admission, submission, retries and fall-back as
``throttler serve``, so groups that fit together run together and a group
larger than the cluster runs in chunks. Each group's line is printed when it
ends; progress (files and bytes read) goes to stderr.

SIGINT (Ctrl-C) or SIGTERM (Argo, Kubernetes, systemd stopping it) stops the
run at once: the handler only sets a flag; the loop then cancels every group
not ended (no retry, no wait for running ones), prints a ``STOPPED`` line for
each, removes their temporary outputs and exits with 128 + the signal's
number. Outputs are only ever replaced whole, so a stopped group's output is
the previous one (or, if its final write had already begun, the complete new
one). A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
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
from throttler.units import count_of
from throttler.worker.output import sweep_temporaries

log = logging.getLogger(__name__)

#: How long ``run`` waits for in-flight groups when it is interrupted.
DRAIN_SECONDS = 30.0


class Interrupt:
    """The first SIGINT or SIGTERM received: the handler sets it, the run's loop acts on it."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM for the rest of the process (main thread only): the cluster's
        close after the run is covered too, so a Ctrl-C there is not a traceback either."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # a second signal: exit now
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class RunResults:
    """Records of the groups that ended, in the order they ended; the groups stopped by an interrupt."""

    expected: int
    records: list[tuple[str, dict]] = field(default_factory=list)
    changed: threading.Event = field(default_factory=threading.Event)
    stopped: list[str] = field(default_factory=list)
    printed: int = 0  #: how many of ``records`` have had their line printed

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
    files = count_of(record["files"], "file")
    if record.get("run_kind") == "unchanged":
        return (f"ok     {record['group']}: {record['rows']:,} rows from {files} (unchanged: "
                f"no file new or changed, 0 files read, output untouched) -> {record['output']}")
    fraction = record.get("worker_peak_fraction")
    peak = "" if fraction is None else f", worker peak {fraction:.0%} of its limit"
    strategy = record["strategy"]
    if record.get("fell_back"):
        strategy += " (keys not aligned)"
    return (f"ok     {record['group']}: {record['rows']:,} rows from {files} in "
            f"{record['seconds']:.2f} s ({strategy}, {run_note(record)}, {record['bytes'] / 2**20:,.1f} MiB read, "
            f"{record['nan_count']} NaN{peak}) -> {record['output']}")


def run_note(record: dict) -> str:
    """``incremental: 1 file read`` or ``full (why): N files read``."""
    if "run_kind" not in record:
        return f"{count_of(record['files'], 'file')} read"
    why = "" if record["run_kind"] == "incremental" else f" ({record['run_reason']})"
    return f"{record['run_kind']}{why}: {count_of(record['files_read'], 'file')} read"


def stopped_line(group: str, interrupt: Interrupt) -> str:
    """The line of a group an interrupt stopped before it ended."""
    return f"STOPPED {group}: interrupted by {interrupt.name} before it ended (outputs are only replaced whole)"


def run_groups(cfg: Config, client, groups: list[str], strategy: str, display: ProgressDisplay,
               print_line=print, full: bool = False, interrupt: Interrupt | None = None) -> RunResults:
    """Run ``groups`` through a service on ``client``; print a line as each ends.

    When ``interrupt`` is set (before or during the run), the groups not ended
    are abandoned at once, each gets a ``STOPPED`` line and is listed in the
    results' ``stopped``."""
    interrupt = interrupt or Interrupt()
    unique = list(dict.fromkeys(groups))
    with tempfile.TemporaryDirectory(prefix="throttler-run-") as spool_dir:
        spool = Spool(spool_dir).ensure()
        results = RunResults(len(unique))
        for group in unique:
            spool.submit(group, strategy=strategy, full=full)
        service = Service(cfg, client, spool=spool, catalog=Catalog(cfg.data_root, cfg.manifest),
                          estimator=Estimator(), metrics=Metrics(), notifier=None)
        service.on_finished = results.add
        abandoned = False
        try:
            if interrupt.signum is None:
                service.start()
                _serve_until_done(service, results, display, print_line, interrupt)
            if interrupt.signum is not None:
                display.close()
                log.warning("interrupted by %s: stopping now (a second signal exits at once)", interrupt.name)
                service.abandon()
                abandoned = True
                _print_stopped(results, unique, interrupt, print_line)
        finally:
            display.close()
            if not abandoned:
                service.drain(DRAIN_SECONDS)
    return results


def _print_stopped(results: RunResults, groups: list[str], interrupt: Interrupt, print_line) -> None:
    ended = {record["group"] for _, record in results.records}
    for kind, record in results.records[results.printed:]:
        print_line(result_line(kind, record))
    results.printed = len(results.records)
    results.stopped = [group for group in groups if group not in ended]
    for group in results.stopped:
        print_line(stopped_line(group, interrupt))


def sweep_stopped(output_root: str, groups: list[str]) -> None:
    """Remove the temporary outputs the stopped groups' tasks left (once no worker runs them)."""
    for group in groups:
        try:
            sweep_temporaries(output_root, group)
        except OSError as exc:
            log.warning("%s: cannot remove its temporary outputs: %s", group, exc)


def _serve_until_done(service: Service, results: RunResults, display: ProgressDisplay, print_line,
                      interrupt: Interrupt) -> None:
    while interrupt.signum is None:
        service.step()
        while results.printed < len(results.records):
            display.clear()
            print_line(result_line(*results.records[results.printed]))
            results.printed += 1
        if results.complete:
            return
        display.update(service.running_groups(), time.monotonic())
        results.changed.wait(0.25)
        results.changed.clear()

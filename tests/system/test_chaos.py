"""Fault injection, short: each scenario of ``benchmarks/chaos.py`` with a few faults.

Every scenario runs its own ``dask scheduler`` and ``dask worker`` processes and the
daemon as a process, injects its faults, and is checked the same way as the full
benchmark: every request closed exactly once, every output equal to a pandas
reference, no stray file in the output directory, the daemon still serving. The
module ends by checking that no process it started is left.
"""

from __future__ import annotations

from dataclasses import replace

import psutil
import pytest

from benchmarks import chaos
from tests.helpers.daemon import leaked_processes

#: a few faults each; about 100 s for the module on a 2-core machine. The scheduler stays
#: away 11 s (the daemon's client gives up at 10 s and must be replaced) and its workers
#: 12 s more (longer than a group's quick retries last); 6 disjoint files of 1.2M rows do
#: not fit a 600 MB worker together, and allowed-failures=1 makes that cost 2 deaths, not 4.
SHORT = chaos.Sizes(kills=5, worker_kills=2, scheduler_restarts=1, scheduler_downtime_seconds=(11.0, 11.5),
                    workers_back_seconds=(12.0, 12.5), settle_seconds=(0.5, 1.0), outage_seconds=5.0,
                    groups=3, files=(2, 3), paths=25_000, dates=12, oom_files=6, oom_paths=100_000,
                    allowed_failures=1, timeout_seconds=90.0)


@pytest.fixture(scope="module", autouse=True)
def no_process_survives():
    """Every process the scenarios started (and every child of them) is gone at the end."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert not leaked_processes(), f"processes left behind: {leaked_processes()}"
    survivors = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and _alive(p)]
    assert not survivors, f"child processes left behind: {survivors}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run(name: str, tmp_path, sizes: chaos.Sizes = SHORT) -> chaos.Outcome:
    outcome = chaos.run_scenario(name, sizes, tmp_path, seed=1)
    print(chaos.table([outcome]), *outcome.notes, sep="\n")
    return outcome


def assert_nothing_lost(outcome: chaos.Outcome) -> None:
    assert outcome.ran, outcome.notes
    assert outcome.requests > 0 and outcome.done + outcome.failed == outcome.requests, outcome
    assert (outcome.lost, outcome.duplicates, outcome.wrong, outcome.stray) == (0, 0, 0, 0), outcome.notes
    assert outcome.serving, outcome.notes


def test_daemon_sigkill_five_times_then_restart(tmp_path):
    outcome = run("daemon-kill", tmp_path)
    assert outcome.faults == 5
    assert_nothing_lost(outcome)
    assert outcome.failed == 0


def test_worker_sigkill_during_a_task_and_during_the_output_write(tmp_path):
    outcome = run("worker-kill", tmp_path)
    assert outcome.faults == 2 and sum(outcome.details["moments"].values()) == 2
    assert any(m.startswith("output write") for m in outcome.details["moments"]), outcome.details
    assert outcome.details["memory_blamed"] == 0  # an operator's SIGKILL raises no estimate
    assert_nothing_lost(outcome)
    assert outcome.failed == 0


def test_scheduler_killed_and_restarted_on_the_same_port(tmp_path):
    outcome = run("scheduler-restart", tmp_path)
    assert outcome.faults == 1
    assert_nothing_lost(outcome)
    assert outcome.failed == 0
    assert outcome.details["failed_attempts"].get("FutureCancelledError"), outcome.details  # in flight, resubmitted
    assert outcome.details["client_replaced"] >= 1, outcome.details  # down 11 s: the client gave up at 10 s
    assert outcome.details["longest_watchdog_gap_seconds"] < 15, outcome.details  # WatchdogSec=30 in deploy/


def test_output_directory_unwritable_for_a_while(tmp_path):
    # sum groups priced at 45% of a task's budget: I/O retries must not inflate them out of the cluster
    paths = chaos.near_budget_paths(1_000_000_000, SHORT.dates, share=0.45)
    sizes = replace(SHORT, paths=paths, files=(2, 2), strategies=("sum",), outage_seconds=6.0)
    outcome = run("output-unwritable", tmp_path, sizes)
    assert outcome.faults == 1
    assert_nothing_lost(outcome)
    assert outcome.failed == 0
    assert outcome.details["failed_attempts"].get("PermissionError"), outcome.details  # the fault was felt


def test_worker_pushed_past_its_memory_limit_by_an_underpriced_group(tmp_path):
    outcome = run("memory", tmp_path)
    assert outcome.faults >= 1, outcome.notes  # the nanny restarted a worker at 95% of its limit
    assert_nothing_lost(outcome)
    oom = outcome.details["oom_record"]
    assert oom["attempts"] >= 2 and "KilledWorker" in oom["history"][0], oom
    # the kill is blamed on the group whose task was running, which is re-planned from its own measured peak
    # (it runs alone, or is refused as measured above what a worker allows); nothing else is blamed
    assert outcome.details["memory_blamed"] >= 1, outcome.notes
    assert oom["reason"] is None or "measured at" in oom["reason"], oom
    # (the sum correction may still move: it learns from the worker RSS of the groups that succeed)
    others = outcome.details["other_groups"]
    assert others["done"] == SHORT.groups + 1 and others["failed"] == 0, others  # + the still-serving probe
    # a sum group queued after it, priced at 80% of a task's budget by the untrained model, still runs
    near = outcome.details["near_record"]
    assert (near["output"], near["reason"]) == (str(tmp_path / "memory" / "out" / "near.parquet"), None), near

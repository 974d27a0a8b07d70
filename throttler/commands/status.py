"""``throttler status``: the queue's real depths, and the daemon's last report if it is alive.

Exit status 0 while the daemon serves or drains (a draining daemon says so,
with its running groups and the seconds to its drain deadline), 3 when it is
not running (as ``systemctl status`` does for a stopped unit). The queue counts are read from
the spool's directories; everything taken from the status file of a daemon
that is not running is labelled "last known".
"""

from __future__ import annotations

import json
import time

from throttler.ops import liveness
from throttler.ops.status import read_status
from throttler.spool.queue import Spool
from throttler.units import format_bytes

EXIT_NOT_RUNNING = 3


def status_document(spool_dir: str, now_unix_seconds: float) -> dict:
    spool = Spool(spool_dir)
    daemon = read_status(spool.state_dir)
    verdict = liveness.check(daemon, now_unix_seconds)
    return {"running": verdict.running, "not_running_reason": verdict.reason or None,
            "queue": spool.counts(), "daemon": daemon}


def main(spool_dir: str, as_json: bool) -> int:
    doc = status_document(spool_dir, time.time())
    if as_json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print("\n".join(status_lines(doc, time.time())))
    return 0 if doc["running"] else EXIT_NOT_RUNNING


def status_lines(doc: dict, now_unix_seconds: float) -> list[str]:
    daemon, q = doc["daemon"], doc["queue"]
    lines = []
    if not doc["running"]:
        seen = ""
        if daemon:
            age = now_unix_seconds - daemon.get("updated_unix_seconds", 0)
            seen = f" (last seen {age:.0f} s ago, pid {daemon.get('pid')})"
        lines.append(f"throttler is not running{seen}: {doc['not_running_reason']}")
    lines.append(f"queue: incoming {q['incoming']}  active {q['active']}  done {q['done']}  failed {q['failed']}")
    if daemon:
        label = "" if doc["running"] else "last known "
        lines += _starting_lines(daemon, label, now_unix_seconds) if "starting" in daemon \
            else _daemon_lines(daemon, label)
    return lines


def _starting_lines(daemon: dict, label: str, now_unix_seconds: float) -> list[str]:
    """A daemon that is not serving yet: what it waits for, and since when."""
    starting = daemon["starting"]
    waited = max(0.0, now_unix_seconds - starting["since_unix_seconds"])
    return [f"{label}daemon pid {daemon['pid']}: starting, {starting['waiting_for']} for {waited:.0f} s"]


def _daemon_lines(daemon: dict, label: str) -> list[str]:
    mem = daemon["cluster_memory"]
    lines = [f"{label}daemon pid {daemon['pid']}: states {daemon['states']}; workers {daemon['workers']}",
             f"{label}cluster memory (admission view): capacity {format_bytes(mem['limit_bytes'])} (memory_fraction "
             f"of the workers' limits), used "
             f"{format_bytes(mem['used_bytes'])}, free {format_bytes(mem['free_bytes'])}, reserved "
             f"{format_bytes(mem['reserved_bytes'])}"]
    if daemon.get("draining"):
        lines.insert(1, f"{label}{draining_line(daemon['draining'])}")
    for address, problem in sorted(daemon.get("workers_incompatible", {}).items()):
        lines.append(f"  {label}INCOMPATIBLE worker {address}: {problem}")
    for address in daemon.get("workers_without_memory_limit", []):
        lines.append(f"  {label}worker {address} has no memory limit: sized from an assumed limit "
                     f"(assumed_worker_memory_bytes, or its host's memory shared by its workers)")
    for address, sizes in sorted(daemon.get("workers_host_capped", {}).items()):
        lines.append(f"  {label}worker {address}: memory_limit {format_bytes(sizes['memory_limit_bytes'])} overcommits"
                     f" its machine with the others there: sized to its share, "
                     f"{format_bytes(sizes['sized_limit_bytes'])}")
    for address, problem in sorted(daemon.get("workers_without_data_access", {}).items()):
        lines.append(f"  {label}NO DATA ACCESS worker {address}: {problem}")
    for r in daemon["running"]:
        progress = ""
        if "files_total" in r:
            progress = (f", {r['files_done']}/{r['files_total']} files, {format_bytes(r['bytes_done'])} of "
                        f"{format_bytes(r['bytes_total'])} read")
        lines.append(f"  {label}running {r['group']}: {r['strategy']}, reserves {format_bytes(r['estimate_bytes'])}, "
                     f"attempt {r['attempt']}, {r['running_seconds']:.1f} s{progress}")
    return lines


def draining_line(draining: dict) -> str:
    """What a draining daemon has left: its running groups and the seconds to its drain deadline."""
    return (f"draining: {draining['running_groups']} running group(s), "
            f"deadline in {draining['deadline_in_seconds']:.0f} s")

"""Is the daemon that wrote a status file still alive? (pure verdict over facts read here)

A status file names its writer's pid and that process's start time (clock
ticks since boot, field 22 of ``/proc/<pid>/stat``). The writer is alive when
a process with that pid exists, started at that time (a reused pid belongs to
another program), and the file is younger than :data:`STALE_AFTER_SECONDS`
(the daemon rewrites it every second; a hung daemon stops doing so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: A status file older than this means the daemon is not serving (it is rewritten every second).
STALE_AFTER_SECONDS = 15.0


@dataclass(frozen=True)
class Liveness:
    running: bool
    reason: str  #: why not, for people ("" when running)


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])  # field 22 counting from 1; fields here start at field 3
    except (IndexError, ValueError):
        return None


def judge(status: dict | None, now_unix_seconds: float, start_ticks_now: int | None) -> Liveness:
    """The verdict on ``status`` given the pid's start time now (None: no such process)."""
    if not status:
        return Liveness(False, "no status file: the daemon has not run with this spool")
    age = now_unix_seconds - float(status.get("updated_unix_seconds", 0))
    if start_ticks_now is None:
        return Liveness(False, f"its pid {status.get('pid')} is gone")
    recorded = status.get("pid_start_ticks")
    if recorded is not None and recorded != start_ticks_now:
        return Liveness(False, f"its pid {status.get('pid')} now belongs to another process")
    if age > STALE_AFTER_SECONDS:
        return Liveness(False, f"its status is {age:.0f} s old (it is rewritten every second)")
    return Liveness(True, "")


def check(status: dict | None, now_unix_seconds: float) -> Liveness:
    pid = int(status.get("pid", 0)) if status else 0
    return judge(status, now_unix_seconds, process_start_ticks(pid) if pid > 0 else None)


def own_start_ticks() -> int | None:
    return process_start_ticks(os.getpid())

"""What a worker process really reached while one task ran: its peak resident memory.

The kernels account the arrays they allocate (``peak_bytes``, which the
estimator learns from). That leaves out the worker's own memory, allocator
pages and library temporaries, which decide whether Dask pauses (80% of the
memory limit) or kills (95%) the worker. So every task is also measured: just
before it runs, the kernel's high-water mark of the process's resident memory
(``VmHWM``) is reset to the current RSS (``/proc/self/clear_refs``, value 5,
Linux 4.0 and later); just after, ``VmHWM`` is read. The reading includes the
worker's own memory and whatever else it held meanwhile, as its memory limit
does.

The mark read right after the reset is the RSS the task starts from; the
peak less that start is the task's rise: what the task itself added. The
worker's idle memory, and partials it holds (a merge's inputs arrive before it
starts), are in the start.

The kernel's resident-memory counters are approximate (kept per CPU and
summed in batches on recent kernels) and the mark is raised only at certain
points (when memory is unmapped), so two readings may disagree by a few pages:
a task that freed memory once read a peak 22 pages below its start. The start
is then taken as the peak (:class:`PeakReading` caps it): a rise is never
negative, a start never above its peak.

With one thread per worker the reading is exactly the process's peak during
the task. With several, a task starting elsewhere in the process resets the
mark too, so a reading is the peak since the latest task start: a lower bound.
Where ``/proc`` is missing or not writable there is no reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from throttler.worker import allocator

CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"


@dataclass(frozen=True)
class PeakReading:
    """A worker's peak RSS during a task, with its memory limit (0: none known) and its RSS when the
    task began (0: not known)."""

    rss_bytes: int = 0
    limit_bytes: int = 0
    start_bytes: int = 0

    def __post_init__(self):
        if self.rss_bytes and self.start_bytes > self.rss_bytes:  # the kernel's counters, a few pages off
            object.__setattr__(self, "start_bytes", self.rss_bytes)

    @property
    def rise_bytes(self) -> int | None:
        """How far the worker's RSS rose above its start during the task: what the task itself
        allocated, allocator pages and temporaries included (inputs that arrived before it started,
        as a merge's partials do, are in the start); None if not known."""
        return self.rss_bytes - self.start_bytes if self.rss_bytes and self.start_bytes else None

    @property
    def fraction(self) -> float | None:
        """Peak over limit, the figure Dask compares with pause (0.8) and terminate (0.95)."""
        return self.rss_bytes / self.limit_bytes if self.limit_bytes else None

    def higher(self, other: "PeakReading") -> "PeakReading":
        """The reading closer to its limit (by bytes where no limit is known)."""
        if self.fraction is not None and other.fraction is not None:
            return other if other.fraction > self.fraction else self
        if self.fraction is None and other.fraction is None:
            return other if other.rss_bytes > self.rss_bytes else self
        return self if self.fraction is not None else other


def reset_high_water_mark() -> bool:
    """Reset this process's VmHWM to its current RSS; False where that is not possible."""
    try:
        with open(CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def high_water_mark_bytes() -> int | None:
    """This process's VmHWM in bytes, or None."""
    try:
        with open(STATUS, "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_memory_limit_bytes() -> int:
    """The memory limit of the Dask worker running this task (0 outside a worker or without one)."""
    try:
        from distributed import get_worker

        return int(get_worker().memory_manager.memory_limit or 0)
    except (ImportError, ValueError, AttributeError, TypeError):
        return 0


class Measured:
    """A task function that also measures the worker's peak RSS while it runs.

    The reading goes into the result: a partial's ``worker_peak`` (kept up the
    tree, the higher one winning) or the final summary's
    ``worker_peak_rss_bytes``, ``worker_memory_limit_bytes`` and ``worker_start_rss_bytes``. It pickles
    as its wrapped function does (by reference), so it ships as a Dask task.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "task")

    def __call__(self, *args, **kwargs):
        measuring = reset_high_water_mark()
        start = (high_water_mark_bytes() or 0) if measuring else 0
        try:
            result = self.fn(*args, **kwargs)
        finally:
            allocator.release_free_memory()
        rss = high_water_mark_bytes() if measuring else None
        if rss is not None:
            attach(result, PeakReading(rss, worker_memory_limit_bytes(), start))
        return result


def attach(result: Any, reading: PeakReading) -> None:
    """Merge ``reading`` into a task's result (a Partial or a final summary dict)."""
    if isinstance(result, dict):
        known = PeakReading(result.get("worker_peak_rss_bytes") or 0, result.get("worker_memory_limit_bytes") or 0,
                            result.get("worker_start_rss_bytes") or 0)
        best = known.higher(reading)
        result["worker_peak_rss_bytes"], result["worker_memory_limit_bytes"] = best.rss_bytes, best.limit_bytes
        result["worker_start_rss_bytes"] = best.start_bytes
    elif hasattr(result, "worker_peak"):
        result.worker_peak = result.worker_peak.higher(reading)

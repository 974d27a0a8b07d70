"""glibc's allocator while a ``dense`` task runs: temporaries from the heap, pages returned after.

Dask's nanny starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``, so
that freed memory goes back to the system and a worker's RSS follows its live
memory. Setting any of glibc's malloc thresholds also fixes its mmap threshold
at 128 KiB (glibc otherwise raises it, up to 32 MiB, as large blocks are freed),
so every allocation over 128 KiB is a fresh ``mmap``: the pages of each row
group's temporaries (8 MB for a million rows) and of the Parquet writer's own
buffers are faulted in on first touch and unmapped on free, over and over, and
every unmap stalls the process's other threads. Measured in one process on the
final task of 10 shuffled 6M-row files (two grids added, 6M rows written): 0.20 s
with the nanny's variable against 0.13 s without it, and 0.13 s with it when the
mmap threshold is set to 32 MiB.

So while a ``dense`` task runs (:func:`with_task_heap` on its leaf, combine and
final functions), the mmap threshold is raised to
``task_mmap_threshold_bytes`` (default 32 MiB, glibc's own ceiling): blocks under
it come from the heap and are reused; grids and accumulators (48 MB for 6M
cells) are still mapped and unmapped on their own. When the task ends,
``malloc_trim(0)`` (:func:`release_free_memory`, which ends every task) gives
the heap's free pages back to the system, so the
worker's RSS between tasks is its live memory, as the nanny intends, and the
threshold goes back to 128 KiB once no such task is running in the process.
The trim threshold is left as it is: the heap's top still goes back as it frees.

Only ``dense`` tasks, the ones measured to gain: in pairs of warm processes the
``dense`` group of 10 shuffled files took 0.82-0.98 of its time, the ``aligned``
group the same (1.01); and the pandas tasks of ``groupby`` held more: on the
memory matrix's queue (benchmarks/memory_matrix.py) its 20-file group peaked at
0.75-0.76 of the worker's limit with every task under it, 0.67-0.69 without.

It acts only where it is needed and safe: glibc is the C library, and the mmap
threshold was fixed by ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_`` without
an explicit ``MALLOC_MMAP_THRESHOLD_`` (an operator's choice is kept; a process
with glibc's dynamic threshold needs nothing). A worker's own
``THROTTLER_TASK_MMAP_THRESHOLD_BYTES`` (0: leave the allocator alone) wins over
the daemon's setting, as for every worker setting
(:mod:`throttler.cluster.worker_settings`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from typing import Callable, Iterator, TypeVar

import pyarrow as pa

from throttler.cluster import worker_settings

M_MMAP_THRESHOLD = -3  #: mallopt's parameter number (glibc malloc.h)
FIXED_MMAP_THRESHOLD_BYTES = 128 * 1024  #: glibc's threshold once any threshold variable is set
#: Variables that fix glibc's mmap threshold at its default (glibc's mallopt: no dynamic threshold).
FIXING_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
#: Variables naming the threshold itself: the operator chose it, it is kept.
CHOOSING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_",)

F = TypeVar("F", bound=Callable)

_lock = threading.Lock()
_running = 0  #: dense tasks running in this process under the raised threshold


def _libc():
    """The process's C library if it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on other C libraries
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def threshold_fixed_by(environ: dict[str, str]) -> bool:
    """Whether ``environ`` fixed glibc's mmap threshold at its default without choosing one."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(name in environ for name in CHOOSING_VARIABLES) or "mmap_threshold" in tunables:
        return False
    return any(name in environ for name in FIXING_VARIABLES) or any(
        f"glibc.malloc.{t}" in tunables for t in ("trim_threshold", "top_pad"))


def task_threshold_bytes() -> int:
    """The threshold a task raises glibc's to: the worker's setting, else the default (0: none)."""
    return worker_settings.configured("task_mmap_threshold_bytes")


def _applies(threshold_bytes: int) -> bool:
    return _LIBC is not None and threshold_bytes > FIXED_MMAP_THRESHOLD_BYTES and threshold_fixed_by(os.environ)


@contextlib.contextmanager
def task_heap() -> Iterator[None]:
    """Run a task with glibc's mmap threshold raised (nestable; the free heap pages go back when the
    task ends, by :func:`release_free_memory`, which every task calls)."""
    threshold_bytes = task_threshold_bytes()
    if not _applies(threshold_bytes):
        yield
        return
    _enter(threshold_bytes)
    try:
        yield
    finally:
        _leave()


def with_task_heap(fn: F) -> F:
    """``fn`` run under :func:`task_heap` (for task functions; pickles by reference as ``fn`` did)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with task_heap():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def release_free_memory() -> None:
    """Give the memory freed during a task back to the system: pyarrow's pool's cached pages and
    glibc's free heap pages (:class:`~throttler.worker.peakrss.Measured` calls it as every task ends).

    The admission budgets subtract a worker's idle RSS measured when it joined
    (docs/memory.md); memory an allocator keeps cached after a task raises the
    RSS that the next task starts from, unseen by the budgets. Measured on a
    worker after a ``dense`` leaf: 325 MiB, against 233 idle, and 270 MiB after
    pyarrow's ``release_unused`` (under 1 ms).
    """
    try:
        pa.default_memory_pool().release_unused()
    except (AttributeError, NotImplementedError, pa.ArrowException):  # pools without it
        pass
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _enter(threshold_bytes: int) -> None:
    global _running
    with _lock:
        _running += 1
        if _running == 1:
            _LIBC.mallopt(M_MMAP_THRESHOLD, threshold_bytes)


def _leave() -> None:
    global _running
    with _lock:
        _running -= 1
        if _running == 0:
            _LIBC.mallopt(M_MMAP_THRESHOLD, FIXED_MMAP_THRESHOLD_BYTES)

"""What is retried, how long to wait, and when to give up: configured in one place.

Failures of a submitted group fall in five classes:

* ``permanent``: bad data, unknown group, a task that cannot fit, a directory
  where the output file goes (or a file where a directory of its path should
  be): fail at once;
* ``misaligned``: the ``aligned`` strategy found files whose keys differ: re-run
  the group with ``sum`` (for ``auto`` requests; an explicit ``aligned`` fails);
* ``memory``: a worker died under the group (``KilledWorker``, ``MemoryError``):
  re-plan with a larger estimate and smaller chunks, then retry;
* ``transient``: the scheduler connection or shared storage failed: retry with
  exponential backoff and jitter (up to ``max_transient_attempts``);
* ``unexpected``: anything else (a bug, an unknown library error): retried with
  the same backoff but only up to ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import tenacity
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from throttler.errors import (
    CatalogError,
    DataError,
    DoesNotFit,
    MisalignedKeys,
    RequestError,
)

PERMANENT, MISALIGNED, MEMORY, TRANSIENT, UNEXPECTED = (
    "permanent", "misaligned", "memory", "transient", "unexpected")

#: exponential backoff with jitter between attempts of one group, capped
BACKOFF = tenacity.wait_exponential_jitter(multiplier=1.0, max=30.0, jitter=1.0)
#: reconnecting to the scheduler (client start, snapshots)
SCHEDULER_RETRY = dict(
    wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5),
    stop=tenacity.stop_after_delay(300),
    retry=tenacity.retry_if_exception_type((OSError, TimeoutError, CommClosedError, asyncio.TimeoutError)),
    reraise=True,
)


#: a path whose shape is wrong (a directory at ``<output>/<group>.parquet``, a file where a directory
#: of the path should be): OSErrors, but nothing a retry waits out, so permanent
WRONG_PATH_TYPES = (IsADirectoryError, NotADirectoryError)

#: failures of the infrastructure, not of the group: worth waiting out
TRANSIENT_TYPES = (OSError, TimeoutError, CommClosedError, concurrent.futures.CancelledError,
                   asyncio.CancelledError, asyncio.TimeoutError)


def classify(exc: BaseException) -> str:
    """The failure class of an exception raised by a group's computation."""
    if isinstance(exc, MisalignedKeys):
        return MISALIGNED
    if isinstance(exc, (DataError, DoesNotFit, RequestError, *WRONG_PATH_TYPES)):
        return PERMANENT
    if isinstance(exc, (KilledWorker, MemoryError)):
        return MEMORY
    if isinstance(exc, TRANSIENT_TYPES):
        return TRANSIENT
    return UNEXPECTED


#: Every value :func:`reason_class` returns: the ``reason`` label of the failure and retry metrics.
REASON_CLASSES = ("data", "catalog", "does_not_fit", "killed_worker", "scheduler", "io", "other")


def reason_class(exc: BaseException) -> str:
    """A bounded label for metrics (never the message itself), one of :data:`REASON_CLASSES`."""
    if isinstance(exc, DoesNotFit):
        return "does_not_fit"
    if isinstance(exc, DataError):
        return "catalog" if isinstance(exc, CatalogError) else "data"
    if isinstance(exc, (KilledWorker, MemoryError)):
        return "killed_worker"
    if isinstance(exc, (CommClosedError, concurrent.futures.CancelledError, asyncio.CancelledError, TimeoutError)):
        return "scheduler"
    if isinstance(exc, OSError):
        return "io"
    return "other"


def backoff_seconds(attempt: int) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1)."""
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return float(BACKOFF(state))


def describe(exc: BaseException) -> str:
    """The failure's reason for people (records, logs): its type and message, at most 2,000 characters."""
    text = _wrong_path_text(exc) or str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:2000]


def _wrong_path_text(exc: BaseException) -> str | None:
    """For :data:`WRONG_PATH_TYPES`: the path in the way and what to do (None when the error names none).

    A rename onto a directory names the temporary file first and the target
    (``<output>/<group>.parquet``) second: the target is the one to name.
    """
    if not isinstance(exc, WRONG_PATH_TYPES):
        return None
    path = exc.filename2 or exc.filename
    if not path:
        return None
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a directory, not a file; remove or rename it, then request the group again (not retried)"
    return (f"{path}: a component of this path is a file, not a directory; fix it, then request the group again "
            "(not retried)")


# --------------------------------------------------------------------------- the decision (pure)

FALL_BACK, RETRY, FAIL = "fall_back", "retry", "fail"



@dataclass(frozen=True)
class Outcome:
    """What to do after a failed attempt: fall back to another strategy, retry, or fail."""

    action: str  #: FALL_BACK, RETRY or FAIL
    kind: str  #: the failure class (see :func:`classify`)
    strategy: str | None = None  #: FALL_BACK: the strategy to plan with next


def decide(kind: str, *, requested_strategy: str, fallback: str | None, attempt: int, memory_failures: int,
           max_attempts: int, max_transient_attempts: int) -> Outcome:
    """The next step after attempt ``attempt`` failed with a failure of class ``kind``.

    ``fallback``: the strategy ``auto`` may turn to when keys were not what the
    failed strategy needs (aligned -> dense -> sum; None after ``sum``).
    ``memory_failures`` counts the attempts that killed a worker, this one
    included. Used alike by the daemon and ``throttler run`` (through the same service).
    """
    if kind == MISALIGNED and requested_strategy == "auto" and fallback is not None:
        return Outcome(FALL_BACK, kind, fallback)
    if kind in (PERMANENT, MISALIGNED):
        return Outcome(FAIL, kind)
    if kind == MEMORY:
        return Outcome(FAIL if memory_failures >= max_attempts else RETRY, kind)
    limit = max_transient_attempts if kind == TRANSIENT else max_attempts
    return Outcome(FAIL if attempt >= limit else RETRY, kind)

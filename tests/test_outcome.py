"""The failure classes and metric reason classes of throttler.service.outcome (pure)."""

import asyncio
import concurrent.futures

import pytest
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from throttler.errors import CatalogError, DataError, DoesNotFit, MisalignedKeys, RequestError
from throttler.service import outcome


CASES = [
    (MisalignedKeys("keys differ"), outcome.MISALIGNED, "data"),
    (CatalogError("unknown group"), outcome.PERMANENT, "catalog"),
    (type("SubCatalogError", (CatalogError,), {})("sub"), outcome.PERMANENT, "catalog"),
    (DataError("bad column"), outcome.PERMANENT, "data"),
    (DoesNotFit("too big"), outcome.PERMANENT, "does_not_fit"),
    (RequestError("bad request"), outcome.PERMANENT, "other"),
    (KilledWorker("t", "w", 3), outcome.MEMORY, "killed_worker"),
    (MemoryError(), outcome.MEMORY, "killed_worker"),
    (CommClosedError("gone"), outcome.TRANSIENT, "scheduler"),
    (concurrent.futures.CancelledError(), outcome.TRANSIENT, "scheduler"),
    (asyncio.TimeoutError(), outcome.TRANSIENT, "scheduler"),
    (FileNotFoundError(2, "gone"), outcome.TRANSIENT, "io"),
    (ValueError("a bug"), outcome.UNEXPECTED, "other"),
]


@pytest.mark.parametrize("exc, failure_class, reason_class", CASES)
def test_each_failure_has_one_class_and_one_reason_class(exc, failure_class, reason_class):
    assert (outcome.classify(exc), outcome.reason_class(exc)) == (failure_class, reason_class)


def test_the_docstring_names_as_many_classes_as_there_are():
    classes = (outcome.PERMANENT, outcome.MISALIGNED, outcome.MEMORY, outcome.TRANSIENT, outcome.UNEXPECTED)
    assert "five classes" in outcome.__doc__
    assert all(f"``{name}``" in outcome.__doc__ for name in classes)


def test_the_reason_classes_are_the_metrics_label_set_and_all_occur():
    from throttler.ops import metrics

    assert metrics.FAILURE_REASONS is outcome.REASON_CLASSES
    assert sorted({reason for _, _, reason in CASES}) == sorted(outcome.REASON_CLASSES)

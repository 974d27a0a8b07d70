"""The failure classes and metric reason classes of throttler.service.outcome (pure)."""

import asyncio
import concurrent.futures
import pickle

import pytest
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from throttler.errors import (
    CatalogError,
    DataError,
    DoesNotFit,
    MisalignedKeys,
    RequestError,
)
from throttler.durable import write_bytes_atomic
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
    (IsADirectoryError(21, "Is a directory", "o/.g.parquet.0123456789ab.tmp", None, "o/g.parquet"),
     outcome.PERMANENT, "io"),
    (NotADirectoryError(20, "Not a directory", "o/.g.parquet.0123456789ab.tmp"), outcome.PERMANENT, "io"),
    (ValueError("a bug"), outcome.UNEXPECTED, "other"),
]


@pytest.mark.parametrize("exc, failure_class, reason_class", CASES)
def test_each_failure_has_one_class_and_one_reason_class(exc, failure_class, reason_class):
    assert (outcome.classify(exc), outcome.reason_class(exc)) == (failure_class, reason_class)


def _write_over(path):
    """The error writing an output at ``path`` raises (as the worker writes it), pickled as Dask sends it."""
    with pytest.raises(OSError) as err:
        write_bytes_atomic(path, b"output")
    return pickle.loads(pickle.dumps(err.value))


def test_a_directory_at_the_output_path_fails_at_once_naming_the_path(tmp_path):
    (tmp_path / "g.parquet" / "part").mkdir(parents=True)
    exc = _write_over(tmp_path / "g.parquet")
    assert type(exc) is IsADirectoryError
    assert outcome.classify(exc) == outcome.PERMANENT
    assert _decide(outcome.classify(exc), attempt=1).action == FAIL  # not 12 attempts over minutes
    assert outcome.describe(exc) == (f"IsADirectoryError: {tmp_path / 'g.parquet'} is a directory, not a file; "
                                     "remove or rename it, then request the group again (not retried)")


def test_a_file_in_place_of_the_output_directory_fails_at_once_naming_the_path(tmp_path):
    (tmp_path / "out").write_text("a file")
    exc = _write_over(tmp_path / "out" / "g.parquet")
    assert type(exc) is NotADirectoryError
    assert exc.filename.startswith(str(tmp_path / "out" / ".g.parquet."))  # the temporary beside the output
    assert outcome.classify(exc) == outcome.PERMANENT
    assert outcome.describe(exc) == (f"NotADirectoryError: {exc.filename}: a component of this path is a file, "
                                     "not a directory; fix it, then request the group again (not retried)")


def test_a_wrong_path_error_without_a_path_keeps_its_message():
    assert outcome.describe(NotADirectoryError("no path here")) == "NotADirectoryError: no path here"
    assert outcome.describe(FileNotFoundError(2, "gone", "o/g.parquet")) == (
        "FileNotFoundError: [Errno 2] gone: 'o/g.parquet'")


def test_the_docstring_names_as_many_classes_as_there_are():
    classes = (outcome.PERMANENT, outcome.MISALIGNED, outcome.MEMORY, outcome.TRANSIENT, outcome.UNEXPECTED)
    assert "five classes" in outcome.__doc__
    assert all(f"``{name}``" in outcome.__doc__ for name in classes)


# --------------------------------------------------------------------------- the decision (pure)

from throttler.service.outcome import FAIL, FALL_BACK, RETRY, decide  # noqa: E402

LIMITS = {"max_attempts": 4, "max_transient_attempts": 12}


def _decide(kind, attempt=1, memory_failures=0, requested="auto", fallback="dense"):
    return decide(kind, requested_strategy=requested, fallback=fallback, attempt=attempt,
                  memory_failures=memory_failures, **LIMITS)


def test_auto_falls_back_on_misaligned_keys_while_a_fallback_remains_an_explicit_strategy_fails():
    assert (_decide("misaligned").action, _decide("misaligned").strategy) == (FALL_BACK, "dense")
    assert (_decide("misaligned", fallback="sum").action, _decide("misaligned", fallback="sum").strategy) == (
        FALL_BACK, "sum")
    assert _decide("misaligned", fallback=None).action == FAIL  # after sum: nothing left
    assert _decide("misaligned", requested="aligned").action == FAIL


def test_permanent_fails_at_once_transient_retries_up_to_its_own_limit():
    assert _decide("permanent").action == FAIL
    assert [_decide("transient", attempt=a).action for a in (1, 11, 12)] == [RETRY, RETRY, FAIL]
    assert [_decide("unexpected", attempt=a).action for a in (3, 4)] == [RETRY, FAIL]


def test_memory_failures_count_only_kills_not_attempts():
    assert _decide("memory", attempt=10, memory_failures=3).action == RETRY
    assert _decide("memory", attempt=4, memory_failures=4).action == FAIL

def test_the_reason_classes_are_the_metrics_label_set_and_all_occur():
    from throttler.ops import metrics

    assert metrics.FAILURE_REASONS is outcome.REASON_CLASSES
    assert sorted({reason for _, _, reason in CASES}) == sorted(outcome.REASON_CLASSES)

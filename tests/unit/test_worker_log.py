"""The worker-side filter: a throttler task failing on its input is one line; anything else is untouched."""

from __future__ import annotations

import logging

import pytest

from throttler.cluster import worker_log

#: distributed.worker's own format (worker.py, ``Compute Failed``) and argument order
DISTRIBUTED_FORMAT = ("Compute Failed\nKey:       %s\nState:     %s\nTask:  %s\nException: %r\nTraceback: %r\n")


def _record(key: str, exception_text: str) -> logging.LogRecord:
    return logging.LogRecord(worker_log.WORKER_LOGGER, logging.ERROR, "worker.py", 2263, DISTRIBUTED_FORMAT,
                             (key, "executing", "<Task ...>", exception_text, '  File "x.py", line 1\n'), None)


def test_a_data_error_of_a_throttler_task_becomes_one_warning_line():
    record = _record("throttler-dense-e4a1-final", "DataError('/d/b.parquet: duplicated key (path=0)')")
    assert worker_log.BadInputFailures().filter(record) is True
    assert (record.levelno, record.levelname) == (logging.WARNING, "WARNING")
    assert record.getMessage() == ("throttler task throttler-dense-e4a1-final failed on its input: "
                                   "DataError('/d/b.parquet: duplicated key (path=0)')")


@pytest.mark.parametrize("name", ["MisalignedKeys", "CatalogError"])
def test_the_data_errors_subclasses_too(name):
    record = _record("('throttler-aligned-1-leaf', 0)", f"{name}('keys differ')")
    worker_log.BadInputFailures().filter(record)
    assert record.getMessage() == f"throttler task ('throttler-aligned-1-leaf', 0) failed on its input: {name}('keys differ')"


@pytest.mark.parametrize("key, exception_text", [
    ("throttler-dense-1-final", "OSError('disk full')"),  # not the input's fault: keep the whole block
    ("throttler-dense-1-final", "KilledWorker('x')"),
    ("someone-elses-task-1", "DataError('not ours')"),  # another client's task of the same name
])
def test_other_failures_keep_distributeds_block(key, exception_text):
    record = _record(key, exception_text)
    before = record.getMessage()
    assert worker_log.BadInputFailures().filter(record) is True
    assert (record.levelno, record.getMessage()) == (logging.ERROR, before)


def test_install_adds_the_filter_once():
    logger = logging.getLogger(worker_log.WORKER_LOGGER)
    try:
        worker_log.install()
        worker_log.install()
        assert sum(isinstance(f, worker_log.BadInputFailures) for f in logger.filters) == 1
    finally:
        for f in [f for f in logger.filters if isinstance(f, worker_log.BadInputFailures)]:
            logger.removeFilter(f)

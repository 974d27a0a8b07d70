"""On the workers: a bad input's task failure is one log line, not distributed's traceback block.

distributed logs every failed task at ERROR as a "Compute Failed" block (key,
task repr, exception, traceback). For throttler's own tasks failing on what a
group's data is (a :class:`~throttler.errors.DataError`: a duplicated key, a
missing column; :class:`~throttler.errors.MisalignedKeys`, which ``auto``
answers by running the group again with another strategy) that block is
noise: the daemon records the failure where users look (``failed/``, the
log, a metric), and on an embedded cluster the block lands on ``throttler
run``'s stderr between its result lines. The filter turns such a record into
one WARNING line naming the task and the error; every other failure, and
every task not throttler's, keeps distributed's block.
"""

from __future__ import annotations

import logging
import re

from throttler import errors

#: the worker logger distributed writes "Compute Failed" to
WORKER_LOGGER = "distributed.worker"

#: the prefix of throttler's task keys (:mod:`throttler.worker.graphs`)
TASK_KEY_PREFIX = "throttler-"

_EXCEPTION_NAME = re.compile(r"^(\w+)\(")


def _expected_names() -> frozenset[str]:
    names, todo = set(), [errors.DataError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


class BadInputFailures(logging.Filter):
    """Rewrites "Compute Failed" records of throttler tasks failing on their input into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("Compute Failed")) or \
                not isinstance(record.args, tuple) or len(record.args) < 4:
            return True
        key, exception_text = str(record.args[0]), str(record.args[3])
        match = _EXCEPTION_NAME.match(exception_text)
        if TASK_KEY_PREFIX not in key or not match or match.group(1) not in _expected_names():
            return True
        record.msg, record.args = "throttler task %s failed on its input: %s", (key, exception_text[:500])
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install() -> None:
    """Add the filter to this worker process's logger (once)."""
    logger = logging.getLogger(WORKER_LOGGER)
    if not any(isinstance(f, BadInputFailures) for f in logger.filters):
        logger.addFilter(BadInputFailures())

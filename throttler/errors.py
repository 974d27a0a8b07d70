"""Error taxonomy: what is retried and what fails a group at once."""


class ThrottlerError(Exception):
    """Base class of every error throttler raises on purpose."""


class DataError(ThrottlerError):
    """Permanent: the input is wrong (missing column, bad type, unreadable file).

    Retrying cannot help; the group fails at once with this message.
    """


class CatalogError(DataError):
    """Permanent: the group is unknown, empty, or names a file outside the data root."""


class MisalignedKeys(DataError):
    """The files of a group do not share the same keys in the same order.

    Raised by the ``aligned`` strategy; ``auto`` answers it by re-running the
    group with the index-aligned ``sum`` strategy.
    """


class DoesNotFit(ThrottlerError):
    """Permanent: a single task of the plan needs more memory than any worker has."""


class NoWorkers(ThrottlerError):
    """Not a failure: the cluster has no worker right now (a scheduler restart, a cluster
    scaled to zero, workers still queued in a batch system); plan again once one joins."""


class RequestError(ThrottlerError):
    """Permanent: a queue request is malformed (bad name, bad JSON, symlink...)."""


class UsageError(ThrottlerError):
    """A command was given inputs it cannot work with (a missing directory, a bad name): exit 2."""


def first_line(exc: BaseException, max_chars: int = 300) -> str:
    """The first line of an exception's message, cut to ``max_chars`` (its class name if it has none):
    libraries' messages can span pages (pyarrow, the AWS SDK), records and logs want one line."""
    lines = str(exc).strip().splitlines()
    return lines[0][:max_chars] if lines else type(exc).__name__

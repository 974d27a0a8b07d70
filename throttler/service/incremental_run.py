"""Prepare one run of a group: full, or incremental over its previous output.

The I/O around the pure :func:`throttler.planning.incremental.decide`: fingerprint
the group's files, read the previous output's state, and return what to plan
(the files to read, plus the previous output when incremental) and where to
write (the output path carrying the new state, see :mod:`throttler.worker.state`).

The previous output is read through a hard link made before its state is read
(a temporary name, ``.<group>.parquet.<12 hex>.tmp``, swept with the group's
temporaries when its run ends): every task of every attempt of this run reads
the one version whose state was checked, even if an earlier attempt of the run
already renamed a new output into place.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from throttler import durable
from throttler.errors import DataError
from throttler import storage
from throttler.planning.footers import file_info, file_infos
from throttler.planning.incremental import FULL, RunDecision, decide
from throttler.planning.plan import FileInfo
from throttler.worker.state import (
    OutputState,
    StatefulOutput,
    fingerprint_files,
    read_state,
)


@dataclass(frozen=True)
class PreparedRun:
    """What one run of a group reads and writes."""

    decision: RunDecision
    files: tuple[FileInfo, ...]  #: to plan: the files to read, then the previous output (incremental)
    target: StatefulOutput  #: the output path, carrying the state to store with it
    group_files: int  #: files of the group (what the output sums)
    previous_rows: int | None = None  #: rows of the previous output (known when it is reused)

    def record_fields(self) -> dict:
        """The done record's fields about the kind of run."""
        return {"run_kind": self.decision.kind, "run_reason": self.decision.reason,
                "files_read": len(self.decision.read), "files": self.group_files}


def prepare(paths: list[str], data_root: str, output_path: str, full_requested: bool) -> PreparedRun:
    """Fingerprint ``paths`` (absolute, under ``data_root``), decide, and gather the footers to plan.

    On object storage every run is full for now (the previous output cannot be
    pinned by a hard link there): the footers are read concurrently.
    """
    if storage.is_url(str(data_root)) or storage.is_url(str(output_path)):
        decision = RunDecision(FULL, "object storage: incremental runs are not supported there yet",
                               tuple(paths))
        return PreparedRun(decision, tuple(file_infos(paths)), output_path, len(paths))
    try:
        current = fingerprint_files(paths, str(data_root))
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: file not found") from None
    except (OSError, pa.ArrowException) as exc:
        for path in paths:  # the planner's own footer check names the bad file and what is wrong with it
            file_info(path)
        raise DataError(f"cannot fingerprint a file of the group ({exc})") from None
    snapshot = None if full_requested else _link_previous(output_path)
    previous = read_state(snapshot) if snapshot else None
    decision = decide(previous, current.by_relative, full_requested=full_requested,
                      output_exists=snapshot is not None)
    rows = _rows(snapshot) if decision.unchanged else None
    if not decision.incremental and snapshot:
        _unlink_quietly(snapshot)
    files = [file_info(current.absolute[rel]) for rel in decision.read]
    if decision.incremental:
        files.append(file_info(snapshot))
    target = StatefulOutput(output_path, OutputState(files=current.by_relative))
    return PreparedRun(decision, tuple(files), target, len(paths), rows)


def _rows(output_path: str) -> int:
    """Rows of an output, from its footer."""
    with storage.open_input(output_path) as source:
        return pq.read_metadata(source).num_rows


def _link_previous(output_path: str) -> str | None:
    """A hard link to the previous output under a temporary name; None if there is none (or no links)."""
    link = durable.temporary_path(output_path)
    try:
        os.link(output_path, link)
    except OSError:  # no previous output, or a file system without hard links: a full run
        return None
    return link


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Prepare one run of a group: full, or incremental over its previous output.

The I/O around the pure :func:`throttler.planning.incremental.decide`: fingerprint
the group's files, read the previous output's state, and return what to plan
(the files to read, plus the previous output when incremental) and where to
write (the output path carrying the new state, see :mod:`throttler.worker.state`).

Locally, the previous output is read through a hard link made before its state is read
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

from throttler import durable, storage
from throttler.errors import DataError
from throttler.planning.footers import file_info, file_infos
from throttler.planning.incremental import RunDecision, decide
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
    #: incremental: the run's private hard link or copy of the previous output (a temporary name,
    #: swept when the run ends; not something a killed attempt left)
    snapshot: str | None = None

    def record_fields(self) -> dict:
        """The done record's fields about the kind of run."""
        return {"run_kind": self.decision.kind, "run_reason": self.decision.reason,
                "files_read": len(self.decision.read), "files": self.group_files}


def prepare(paths: list[str], data_root: str, output_path: str, full_requested: bool) -> PreparedRun:
    """Fingerprint ``paths`` (absolute, under ``data_root``), decide, and gather the footers to plan.

    On object storage the fingerprints and footers are read concurrently, and
    the previous output is pinned by a private copy (:func:`_decide_object`).
    """
    try:
        current = fingerprint_files(paths, str(data_root))
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: file not found") from None
    except (OSError, pa.ArrowException) as exc:
        for path in paths:  # the planner's own footer check names the bad file and what is wrong with it
            file_info(path)
        raise DataError(f"cannot fingerprint a file of the group ({exc})") from None
    if storage.is_url(str(output_path)):
        decision, snapshot, rows = _decide_object(output_path, current.by_relative, full_requested)
    else:
        decision, snapshot, rows = _decide_local(output_path, current.by_relative, full_requested)
    files = file_infos([current.absolute[rel] for rel in decision.read])
    if decision.incremental:
        files.append(file_info(snapshot))
    target = StatefulOutput(output_path, OutputState(files=current.by_relative))
    return PreparedRun(decision, tuple(files), target, len(paths), rows, snapshot)


def _decide_local(output_path: str, current: dict[str, str], full_requested: bool):
    """(decision, the previous output's hard link when incremental, its rows when unchanged)."""
    snapshot = None if full_requested else _link_previous(output_path)
    previous = read_state(snapshot) if snapshot else None
    decision = decide(previous, current, full_requested=full_requested, output_exists=snapshot is not None)
    rows = _rows(snapshot) if decision.unchanged else None
    if not decision.incremental and snapshot:
        _unlink_quietly(snapshot)
    return decision, snapshot if decision.incremental else None, rows


def _decide_object(output_url: str, current: dict[str, str], full_requested: bool):
    """:func:`_decide_local` for an output on object storage, where no hard link exists.

    The state is read from the output object (its footer, by ranged GETs). Only
    when the output can be extended is it copied, server-side, to a private key
    (``.<group>.parquet.<12 hex>.tmp`` beside it, swept when the group's run
    ends): the copy is one whole version of the output, which nothing else
    writes, and the decision is made again on the copy's own state, so the
    state acted on and the sums every task reads come from the same object
    even if the output was replaced between the read and the copy (by an
    earlier attempt of this run, say). An unchanged output is left alone (not
    copied): its state says it already is the answer.
    """
    if full_requested:
        return decide(None, current, full_requested=True), None, None
    previous = read_state(output_url)
    exists = previous is not None or _object_exists(output_url)
    decision = decide(previous, current, output_exists=exists)
    if decision.unchanged:
        return decision, None, _rows(output_url)
    if not decision.incremental:
        return decision, None, None
    snapshot = durable.temporary_path(output_url)
    try:
        storage.copy_object(output_url, snapshot)
    except FileNotFoundError:  # the output went away since its state was read
        return decide(None, current, output_exists=False), None, None
    decision = decide(read_state(snapshot), current)
    rows = _rows(snapshot) if decision.unchanged else None
    if not decision.incremental:
        storage.delete_object(snapshot)
    return decision, snapshot if decision.incremental else None, rows


def _object_exists(url: str) -> bool:
    try:
        storage.size_bytes(url)
    except FileNotFoundError:
        return False
    return True


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

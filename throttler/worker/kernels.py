"""Task functions that run on Dask workers: leaf reads, combines, the final write.

Every strategy follows one shape: leaf tasks read a slice of the group's files
into a partial result, combine tasks add partials in a tree, and the final task
adds the last partials and writes the group's output file atomically. Only a
small summary dict travels back to the client.

NaN inputs are skipped (treated as 0, like pandas ``groupby().sum()``) and
counted; infinities are summed as IEEE arithmetic gives (inf + -inf = NaN).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from dask.sizeof import sizeof

from throttler import storage
from throttler.errors import DataError, MisalignedKeys
from throttler.worker import contract, prefetch, regroup, store_reads
from throttler.worker.output import (
    output_schema,
    output_table,
    write_output,
    write_table,
    write_tables,
)
from throttler.worker.peakrss import PeakReading
from throttler.worker.progress import FileProgress


@dataclass
class Partial:
    """A partial sum plus the bookkeeping that travels up the tree."""

    data: Any  #: ndarray (aligned), Series (sum) or DataFrame (groupby)
    date_type: pa.DataType | None = None
    files: int = 0
    bytes_read: int = 0
    nan_count: int = 0
    peak_bytes: int = 0
    task_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    worker_peak: PeakReading = field(default_factory=PeakReading)  #: set by peakrss.Measured

    def absorb_stats(self, other: "Partial") -> None:
        self.files += other.files
        self.bytes_read += other.bytes_read
        self.nan_count += other.nan_count
        self.peak_bytes = max(self.peak_bytes, other.peak_bytes)
        self.task_seconds += other.task_seconds
        self.worker_peak = self.worker_peak.higher(other.worker_peak)
        if self.date_type is None:
            self.date_type = other.date_type


def _skip_nans(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(values with NaN replaced by 0, NaN count); one cheap pass when there are none."""
    total = values.sum()
    if np.isfinite(total):
        return values, 0
    nan_mask = np.isnan(values)
    count = int(np.count_nonzero(nan_mask))
    return (np.where(nan_mask, 0.0, values) if count else values), count


# --------------------------------------------------------------------------- aligned


class _Reference:
    """The group's first file: its encoded key chunks and, only if needed, its decoded keys."""

    def __init__(self, path: str, reads: store_reads.StoreReads | None = None, lazy: bool = False):
        """``reads``: on an object store, the key ranges are fetched through it (concurrent GETs).

        ``lazy``: the key chunks are read only when a file's footer layout could
        match them (``dense``, whose not-aligned files never need them: a
        shuffled reference's key chunks are 13 MB).
        """
        self.path, self._key_chunks = path, None
        if reads is None or not storage.is_url(path):
            pf = contract.open_parquet(path)
            self.schema = contract.check_schema(pf, path)
            if not lazy:
                self._key_chunks = contract.key_chunks(pf, path, self.schema)
        else:
            with contract.open_source(path) as source:
                pf = contract.open_parquet(path, source)
                self.schema = contract.check_schema(pf, path)
                self._key_chunks = contract.key_chunks(pf, path, self.schema, reads.ranges_reader(source))
        self.key_layout = contract.key_layout(pf, self.schema)
        self._keys: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def key_chunks(self) -> list[bytes]:
        if self._key_chunks is None:
            self._key_chunks = contract.key_chunks(contract.open_parquet(self.path), self.path, self.schema)
        return self._key_chunks

    def same_key_bytes(self, pf, path: str, schema: contract.FileSchema, read_ranges=None) -> bool:
        """True when ``path``'s key chunks are byte-identical to the reference's (so are its keys).

        A file whose chunk layout (row groups, encodings, sizes: its footer) differs
        cannot match: its key bytes are not read.
        """
        if path == self.path:
            return True
        return schema.num_rows == self.schema.num_rows and contract.key_layout(pf, schema) == self.key_layout \
            and contract.key_chunks(pf, path, schema, read_ranges) == self.key_chunks

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None:
            self._keys = contract.read_keys(contract.open_parquet(self.path), self.path)
        return self._keys

    def verify_same_keys(self, pf, path: str) -> int:
        """Decode ``path``'s keys and compare with the reference; returns bytes held."""
        ref_paths, ref_dates = self.keys()
        paths, dates = contract.read_keys(pf, path)
        if len(paths) != len(ref_paths):
            raise MisalignedKeys(f"{path}: {len(paths)} rows, but {self.path} has {len(ref_paths)}:"
                                 " keys are not aligned")
        if not (np.array_equal(paths, ref_paths) and np.array_equal(dates, ref_dates)):
            bad = int(np.argmax((paths != ref_paths) | (dates != ref_dates)))
            raise MisalignedKeys(f"{path}: keys differ from {self.path} at row {bad}: keys are not aligned")
        return 4 * paths.nbytes


def aligned_leaf(paths: list[str], reference_path: str) -> Partial:
    """Stream the ``value`` column of each file into one float64 accumulator.

    Memory: the accumulator plus one row group, however many files the leaf
    reads. Each file's keys are verified against the reference by comparing
    their encoded bytes; only a file whose bytes differ has its keys decoded
    and compared.

    NaN inputs: the first pass adds values as they are. NaN propagates through
    addition, so an accumulator whose sum is not NaN proves no input was NaN
    (one pass over the accumulator instead of one over every input). Otherwise
    the leaf runs again, replacing and counting NaN values chunk by chunk: a
    leaf with NaN inputs (or with ``inf + -inf``) costs about two passes.
    """
    part = _aligned_pass(paths, reference_path, skip_nans=False, progress=FileProgress())
    with np.errstate(invalid="ignore"):
        if not np.isnan(part.data.sum()):
            return part
    del part  # one accumulator at a time
    return _aligned_pass(paths, reference_path, skip_nans=True)


def _aligned_pass(paths: list[str], reference_path: str, skip_nans: bool,
                  progress: FileProgress | None = None) -> Partial:
    started = time.perf_counter()
    reads = store_reads.StoreReads() if any(storage.is_url(p) for p in paths + [reference_path]) else None
    with contextlib.closing(reads) if reads is not None else contextlib.nullcontext():
        ref = _Reference(reference_path, reads)
        acc = np.zeros(ref.schema.num_rows, dtype=np.float64)
        part = Partial(acc, date_type=ref.schema.date_type)
        peak = acc.nbytes
        for held, size in _added_files(acc, ref, paths, part, skip_nans, reads):
            peak = max(peak, acc.nbytes + held)
            part.files += 1
            part.bytes_read += size
            if progress is not None:
                progress.add(size)
    if progress is not None:
        progress.send()
    part.peak_bytes = peak
    part.task_seconds = time.perf_counter() - started
    return part


def _added_files(acc: np.ndarray, ref: _Reference, paths: list[str], part: Partial, skip_nans: bool,
                 reads: store_reads.StoreReads | None):
    """Verify each file's keys and add its values into ``acc``; yields (bytes held at most, file size) a file.

    Local files are memory-mapped and read in turn. On an object store, each
    file is opened (one HEAD, one footer GET) and its key bytes compared up to
    two files ahead, while the current file has its value chunks fetched
    ``reads.in_flight`` GETs at a time and added (:mod:`throttler.worker.store_reads`).
    """
    if reads is None:
        for path in paths:
            pf = contract.open_checked(path, load_numba=False)
            schema = contract.check_schema(pf, path)
            extra = 0 if ref.same_key_bytes(pf, path, schema) else ref.verify_same_keys(pf, path)
            yield max(extra, _add_values(acc, pf, path, part, skip_nans)), storage.size_bytes(path)
        return
    with contextlib.closing(reads.opened_ahead(paths, ref.same_key_bytes)) as files:
        for f in files:
            with f.source:
                extra = 0 if f.same_key_bytes else ref.verify_same_keys(f.pf, f.path)
                largest = _add_values(acc, f.pf, f.path, part, skip_nans, reads.value_arrays(f.pf, f.source, f.path))
                held_arrays = min(reads.in_flight + 1, f.schema.num_row_groups)  # decoded, waiting, the one added
                yield max(extra, largest * held_arrays + f.key_bytes), f.source.size()


def _add_values(acc: np.ndarray, pf, path: str, part: Partial, skip_nans: bool, arrays=None) -> int:
    """Add every row group's values into ``acc`` in place (``arrays``: the row groups' value
    arrays as read ahead, else read here in turn); returns the largest chunk held."""
    offset, largest = 0, 0
    if arrays is None:
        arrays = (contract.read_values(pf, rg, path) for rg in range(pf.metadata.num_row_groups))
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says: no warning
        for values in arrays:
            if skip_nans:
                values, nans = _skip_nans(values)
                part.nan_count += nans
            n = len(values)
            np.add(acc[offset:offset + n], values, out=acc[offset:offset + n])
            offset += n
            largest = max(largest, values.nbytes)
    return largest


def _sum_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    """The element-wise sum in a fresh array (one pass for two inputs, no copy first)."""
    if len(arrays) == 1:
        return arrays[0].copy()
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as the contract says: no warning
        total = np.add(arrays[0], arrays[1])
        for arr in arrays[2:]:
            total += arr
    return total


def aligned_combine(partials: list[Partial]) -> Partial:
    """Add accumulators (into a fresh array: inputs may be reused on a retry)."""
    started = time.perf_counter()
    out = Partial(_sum_arrays([p.data for p in partials]))
    for p in partials:
        out.absorb_stats(p)
    out.peak_bytes = max(out.peak_bytes, out.data.nbytes * (len(partials) + 1))
    out.task_seconds += time.perf_counter() - started
    return out


def aligned_result(partials: list[Partial], reference_path: str) -> tuple[Partial, pa.Table, int]:
    """Add the last partials and attach the reference keys, sorted by (path, Date).

    Returns (total, output table, peak bytes): everything the final task does
    but the write. The keys go to the output as the reference file stores
    them (``path`` widened to int64 by :func:`output_table`): no decode to
    nanoseconds and back. A single partial is read, never copied or changed.
    """
    if len(partials) == 1:
        total = Partial(partials[0].data)
        total.absorb_stats(partials[0])
    else:
        total = aligned_combine(partials)
    paths, dates = contract.stored_keys(contract.open_checked(reference_path, load_numba=False), reference_path)
    values, peak = total.data, max(total.peak_bytes, total.data.nbytes * 4)
    if not contract.stored_keys_sorted(paths, dates):  # rare: the simulator writes keys sorted
        order = contract.sort_keys(*contract.normalise_keys(pa.table({"path": paths, "Date": dates}),
                                                            reference_path), reference_path)
        paths, dates, values = paths.take(order), dates.take(order), values[order]
        peak = max(peak, total.data.nbytes * 5 + order.nbytes)
    return total, output_table(paths, dates, values), peak


#: Rows of one output row group, prepared and encoded in turn by the aligned final
#: task (the Parquet writer's default row group size).
OUTPUT_ROW_GROUP_ROWS = 1 << 20


class _KeysNotSorted(Exception):
    """The reference's keys are not strictly increasing: the output must be sorted whole."""


def aligned_final(partials: list[Partial], reference_path: str, output_path: str) -> dict:
    """Add the last partials, attach the reference keys, write the output.

    Streamed: a thread prepares each row group (keys decoded as stored and
    checked, partial sums added) while the writer encodes the one before and
    writes it to the temporary file, so preparing costs almost no time on top
    of encoding (see benchmarks/README.md). Keys found out of order anywhere
    (rare: the simulator writes them sorted) make the task start over the
    whole-table way, which sorts; the streamed attempt's temporary file is
    removed and nothing was renamed into place.
    """
    started = time.perf_counter()
    check_not_empty(partials)
    total = Partial(None)
    for part in partials:
        total.absorb_stats(part)
    pf = contract.open_checked(reference_path, load_numba=False)
    schema = output_schema(pf.schema_arrow.field("Date").type)
    try:
        with contextlib.closing(prefetch.ahead(_output_row_groups(partials, pf, reference_path))) as tables:
            written = write_tables(output_path, schema, tables)
    except _KeysNotSorted:
        total, table, peak = aligned_result(partials, reference_path)
        return _summary(total, write_table(output_path, table), table.num_rows, peak, started, output_path,
                        "aligned")
    rows = len(partials[0].data)
    peak = max(total.peak_bytes, partials[0].data.nbytes * len(partials) + OUTPUT_ROW_GROUP_ROWS * 3 * 24)
    return _summary(total, written, rows, peak, started, output_path, "aligned")


def _output_row_groups(partials: list[Partial], pf, reference_path: str):
    """Output tables of OUTPUT_ROW_GROUP_ROWS rows: the reference's keys as stored, the sums of the partials."""
    rows = len(partials[0].data)
    start, previous = 0, None  # previous: the last key before this batch, as 1-row (paths, dates)
    for paths, dates in contract.iter_key_batches(pf, reference_path, OUTPUT_ROW_GROUP_ROWS):
        stop = start + len(paths)
        if stop > rows:
            raise DataError(f"{reference_path}: more rows than the partial sums ({rows})")
        checked = (paths, dates) if previous is None else (  # the boundary is checked as any chunk boundary
            pa.chunked_array(previous[0].chunks + paths.chunks), pa.chunked_array(previous[1].chunks + dates.chunks))
        if not contract.stored_keys_sorted(*checked):
            raise _KeysNotSorted(reference_path)
        if len(paths):
            previous = paths[-1:], dates[-1:]
        values = partials[0].data[start:stop] if len(partials) == 1 else \
            _sum_arrays([p.data[start:stop] for p in partials])
        yield output_table(paths, dates, values)
        start = stop
    if start != rows:
        raise DataError(f"{reference_path}: {start} rows, but the partial sums have {rows}")


def _finish(total: Partial, paths, dates, values, output_path, peak, started, strategy) -> dict:
    written = write_output(output_path, paths, dates, values, total.date_type)
    return _summary(total, written, len(values), peak, started, output_path, strategy)


def _summary(total: Partial, written: int, rows: int, peak, started, output_path, strategy) -> dict:
    return {
        "strategy": strategy,
        "rows": int(rows),
        "files": total.files,
        "bytes_read": total.bytes_read,
        "bytes_written": written,
        "nan_count": total.nan_count,
        "peak_bytes": int(peak),
        "task_seconds": round(total.task_seconds + time.perf_counter() - started, 6),
        "output": output_path,
        "worker_peak_rss_bytes": total.worker_peak.rss_bytes,
        "worker_memory_limit_bytes": total.worker_peak.limit_bytes,
        "worker_start_rss_bytes": total.worker_peak.start_bytes,
    }


# --------------------------------------------------------------------------- sum


def _read_frame(path: str, part: Partial, progress: FileProgress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one file's keys (int64) and values (float64, NaN skipped) and check the keys."""
    pf = contract.open_checked(path, load_numba=False)
    schema = contract.check_schema(pf, path)
    if part.date_type is None:
        part.date_type = schema.date_type
    table = contract.read_columns(pf, path, contract.REQUIRED_COLUMNS)
    paths, dates = contract.normalise_keys(table, path)
    col = table.column(contract.VALUE_COLUMN)
    values = col.to_numpy() if col.null_count == 0 else col.to_numpy(zero_copy_only=False)
    values, nans = _skip_nans(values.astype(np.float64, copy=False))
    part.nan_count += nans
    part.files += 1
    size = storage.size_bytes(path)
    part.bytes_read += size
    progress.add(size)
    return paths, dates, values


def _series(paths, dates, values, path: str) -> pd.Series:
    index = pd.MultiIndex.from_arrays([paths, dates], names=list(contract.KEY_COLUMNS))
    if not contract.keys_strictly_sorted(paths, dates) and not index.is_unique:
        contract.sort_keys(paths, dates, path)  # raises with the duplicated key
    return pd.Series(values, index=index, name=contract.VALUE_COLUMN)


def sum_leaf(paths: list[str]) -> Partial:
    """Index-aligned summation: fold each file's (path, Date)-indexed Series in turn."""
    started = time.perf_counter()
    part, progress = Partial(None), FileProgress()
    for path in paths:
        p, d, v = _read_frame(path, part, progress)
        series = _series(p, d, v, path)
        held = _series_bytes(series) * (1 if part.data is None else 3)
        part.data = series if part.data is None else _add_series(part.data, series)
        part.peak_bytes = max(part.peak_bytes, held)
    progress.send()
    part.task_seconds = time.perf_counter() - started
    return part


def _add_series(a: pd.Series, b: pd.Series) -> pd.Series:
    """a + b over the union of their keys; a key in one only keeps its value.

    NaN inputs were replaced by 0 when read, so a NaN here is the IEEE sum of
    opposite infinities: it stays NaN (``fill_value`` alone would turn it into
    the other side's value, as if it were missing).
    """
    with np.errstate(invalid="ignore"):
        total = a.add(b, fill_value=0.0)
    for side in (a, b):
        if side.hasnans:
            total.loc[side.index[side.isna().to_numpy()]] = np.nan
    return total


def _series_bytes(series: pd.Series) -> int:
    return int(series.memory_usage(index=True, deep=False))


def sum_combine(partials: list[Partial]) -> Partial:
    started = time.perf_counter()
    out = Partial(partials[0].data)
    out.absorb_stats(partials[0])
    for p in partials[1:]:
        out.data = _add_series(out.data, p.data)
        out.absorb_stats(p)
    out.peak_bytes = max(out.peak_bytes, _series_bytes(out.data) * (len(partials) + 1))
    out.task_seconds += time.perf_counter() - started
    return out


def sum_final(partials: list[Partial], output_path: str) -> dict:
    started = time.perf_counter()
    total = sum_combine(partials)
    series = total.data.sort_index()
    paths = series.index.get_level_values(0).to_numpy(dtype=np.int64)
    dates = series.index.get_level_values(1).to_numpy(dtype=np.int64)
    return _finish(total, paths, dates, series.to_numpy(dtype=np.float64), output_path,
                   total.peak_bytes, started, "sum")


# --------------------------------------------------------------------------- groupby


def _grouped(frame: pd.DataFrame) -> pd.DataFrame:
    """Sum by key. NaN inputs were replaced by 0 when read: a NaN here is the IEEE sum
    of opposite infinities and must stay NaN in the levels above (``skipna=False``)."""
    return frame.groupby(list(contract.KEY_COLUMNS), sort=False, as_index=False)[contract.VALUE_COLUMN].sum(
        skipna=False)


def groupby_leaf(paths: list[str]) -> Partial:
    """The seed's chunked group-by: a chunk of files, grouped and summed (:mod:`throttler.worker.regroup`)."""
    started = time.perf_counter()
    part, progress = Partial(None), FileProgress()
    parts = []
    for path in paths:
        p, d, v = _read_frame(path, part, progress)
        if not contract.keys_strictly_sorted(p, d):
            contract.sort_keys(p, d, path)  # raises on a duplicated key
        parts.append((p, d, v))
    progress.send()
    part.data = _regrouped(parts)
    part.peak_bytes = sum(v.nbytes for _, _, v in parts) * regroup.HELD_PER_VALUE_BYTE + sizeof(part.data)
    part.task_seconds = time.perf_counter() - started
    return part


def _regrouped(parts: list[regroup.Keys]) -> pd.DataFrame:
    """Sum by key with one int64 code a row; pandas' hash group-by when the keys cannot be coded so."""
    out = regroup.regroup(parts)
    if out is not None:
        return regroup.as_frame(*out)
    return _grouped(pd.concat([regroup.as_frame(*p) for p in parts], ignore_index=True))


def groupby_combine(partials: list[Partial]) -> Partial:
    """Regroup (:mod:`throttler.worker.regroup`); partials with identical keys are added as
    arrays instead (half the regroup's peak RSS: benchmarks/groupby_combine_peak.py)."""
    started = time.perf_counter()
    out = Partial(None)
    for p in partials:
        out.absorb_stats(p)
    added = _add_if_same_keys([p.data for p in partials])
    if added is not None:
        out.data = added
        out.peak_bytes = max(out.peak_bytes, int(added.memory_usage(deep=False).sum() * 2))
    else:
        frames = [p.data for p in partials]
        out.data = _regrouped([(f["path"].to_numpy(np.int64), f["Date"].to_numpy(np.int64),
                                f[contract.VALUE_COLUMN].to_numpy(np.float64)) for f in frames])
        held = sum(len(f) for f in frames) * 8 * regroup.HELD_PER_VALUE_BYTE
        out.peak_bytes = max(out.peak_bytes, held + sizeof(out.data))
    out.task_seconds += time.perf_counter() - started
    return out


def _add_if_same_keys(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    """The frames' values added row by row when every frame has the first one's keys, else None.

    Each frame's keys are unique (a grouped result), so equal key columns mean
    the same groups in the same order; NaN propagates as ``skipna=False`` does.
    """
    first = frames[0]
    keys = [first[c].to_numpy() for c in contract.KEY_COLUMNS]
    for frame in frames[1:]:
        if len(frame) != len(first) or not all(
                np.array_equal(k, frame[c].to_numpy()) for k, c in zip(keys, contract.KEY_COLUMNS)):
            return None
    values = _sum_arrays([f[contract.VALUE_COLUMN].to_numpy(np.float64) for f in frames])
    return pd.DataFrame(dict(zip(contract.KEY_COLUMNS, keys), **{contract.VALUE_COLUMN: values}))


def groupby_final(partials: list[Partial], output_path: str) -> dict:
    started = time.perf_counter()
    total = groupby_combine(partials)
    frame = total.data
    if not contract.keys_strictly_sorted(frame["path"].to_numpy(np.int64), frame["Date"].to_numpy(np.int64)):
        frame = frame.sort_values(list(contract.KEY_COLUMNS), kind="stable")
    return _finish(total, frame["path"].to_numpy(np.int64), frame["Date"].to_numpy(np.int64),
                   frame["value"].to_numpy(np.float64), output_path, total.peak_bytes, started, "groupby")


def single_task(leaf_fn, final_fn, paths: list[str], extra: tuple, output_path: str) -> dict:
    """A whole group in one task: the leaf over every file, then the final on its one partial.

    Memory never exceeds the larger of the two: the leaf's buffers are gone
    before the final starts, and the partial is the final's one input.
    """
    return final_fn([leaf_fn(paths, *extra)], *extra, output_path)


def check_not_empty(partials: list[Partial]) -> None:
    if not partials:
        raise DataError("group has no files")


@sizeof.register(Partial)
def _sizeof_partial(part: Partial) -> int:
    """What a held partial result weighs, so Dask's managed memory (and spilling) see it."""
    return sizeof(part.data) + 1024

"""Overlapped reads of a file on an object store: the aligned leaf's key and value chunks.

On an object store every ``read_at`` is one ranged GET, and a GET costs a
round trip (tens of ms to a cloud store) before its first byte. Read one at a
time, as pyarrow's ``read_row_group`` does (its pre-buffering fetches only the
chunks of the row group asked for), a seed file's 6 key ranges and 6 value
chunks cost 12 round trips in sequence, and a single GET stream rarely fills a
pod's link. Here the ranges of one file are fetched by a small thread pool,
:data:`~throttler.config.Config.object_store_reads_in_flight` GETs at a time
(pyarrow's S3 ``read_at`` is thread-safe and releases the GIL; each value read
decodes through its own ``ParquetFile`` over the shared source, given the
already-read footer, so no footer is read again).

Local files never come here: they stay memory-mapped and read in sequence,
which is as fast as the page cache and the disk allow.

The next files are opened (HEAD, footer) and their key ranges compared up to
two files ahead, in a thread, while the current file's value chunks arrive.

Memory: value reads are submitted one file at a time and never ahead of the
file being summed, so a leaf holds at most that file's row groups at once
(their encoded chunks while they arrive, their decoded arrays until they are
added): within the memory model's aligned leaf bound, which already counts a
whole file's on-disk bytes plus its decoded bytes (the memory-mapped case).
The files opened ahead hold only their footers and key chunks (0.7 MB a seed
file, 1.5% of it), inside the model's per-task slack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from throttler.cluster import worker_settings
from throttler.worker import contract, prefetch

#: Ranges closer than this are fetched as one GET (the key columns of a row group are adjacent).
COALESCE_HOLE_BYTES = 8 * 1024


def reads_in_flight() -> int:
    """The worker's setting: its own ``THROTTLER_OBJECT_STORE_READS_IN_FLIGHT``, else the daemon's
    value (given by its worker plugin, :mod:`throttler.cluster.worker_settings`), else the default.

    Workers do not read the daemon's configuration file (they may run anywhere).
    """
    return worker_settings.configured("object_store_reads_in_flight")


def coalesce(ranges: list[tuple[int, int]], hole_bytes: int = COALESCE_HOLE_BYTES) -> list[tuple[int, int]]:
    """(offset, length) ranges merged where the gap between neighbours is at most ``hole_bytes``."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if merged and offset - (merged[-1][0] + merged[-1][1]) <= hole_bytes:
            merged[-1][1] = max(merged[-1][1], offset + length - merged[-1][0])
        else:
            merged.append([offset, length])
    return [(o, n) for o, n in merged]


@dataclass
class OpenedFile:
    """An object store file opened for the aligned leaf, its key bytes already compared."""

    path: str
    source: pa.NativeFile
    pf: pq.ParquetFile
    schema: contract.FileSchema
    same_key_bytes: bool  #: its key chunks are byte-identical to the reference's
    key_bytes: int  #: the key chunk bytes read (held by the prefetch while waiting)


class StoreReads:
    """A leaf's pool of ``in_flight`` threads doing its object store reads; :meth:`close` it when done."""

    def __init__(self, in_flight: int | None = None):
        self.in_flight = in_flight or reads_in_flight()
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="throttler-store-read")

    def close(self) -> None:
        """Stop: reads not started are dropped, running ones are waited for."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def ranges_reader(self, source: pa.NativeFile) -> Callable[[list[tuple[int, int]]], list[bytes]]:
        """A function reading ``(offset, length)`` ranges of ``source``, coalesced and concurrently."""
        def read(ranges: list[tuple[int, int]]) -> list[bytes]:
            fetches = coalesce(ranges)
            blobs = dict(zip(fetches, self._pool.map(lambda r: source.read_at(r[1], r[0]), fetches)))
            out = []
            for offset, length in ranges:
                start, blob = next((s, b) for (s, n), b in blobs.items() if s <= offset and offset + length <= s + n)
                out.append(blob[offset - start:offset - start + length])
            return out
        return read

    def opened_ahead(self, paths: list[str], same_key_bytes: Callable[..., bool]) -> Iterator[OpenedFile]:
        """Each file opened and its key bytes compared by ``same_key_bytes(pf, path, schema, read_ranges)``,
        in order, computed in a thread up to two files ahead of the consumer (:func:`prefetch.ahead`):
        the next files' HEAD, footer and key GETs overlap the current file's value reads. Close the
        iterator to stop it; a file's errors are raised when the consumer reaches that file."""
        def opened() -> Iterator[OpenedFile]:
            for path in paths:
                source = contract.open_source(path)
                try:
                    pf = contract.open_parquet(path, source)
                    schema = contract.check_schema(pf, path)
                    same = same_key_bytes(pf, path, schema, self.ranges_reader(source))
                except BaseException:
                    source.close()
                    raise
                yield OpenedFile(path, source, pf, schema, same, _key_chunk_bytes(pf.metadata))
        return prefetch.ahead(opened())

    def value_arrays(self, pf: pq.ParquetFile, source: pa.NativeFile, path: str) -> Iterator[np.ndarray]:
        """Each row group's ``value`` array, in order; all of the file's row groups are requested at
        once, :attr:`in_flight` at a time. Stopping early drops the reads not started."""
        metadata = pf.metadata

        def one(row_group: int) -> np.ndarray:
            reader = pq.ParquetFile(source, metadata=metadata, pre_buffer=False, page_checksum_verification=True)
            return contract.read_values(reader, row_group, path)

        futures: list[Future] = [self._pool.submit(one, rg) for rg in range(metadata.num_row_groups)]
        try:
            for future in futures:
                yield future.result()
        finally:  # stopped early (an error): drop the rest, let running reads end before the source closes
            for future in futures:
                future.cancel()
            wait(futures)


def _key_chunk_bytes(md: pq.FileMetaData) -> int:
    """The encoded bytes of a file's key column chunks (what the key comparison read)."""
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    key_idx = [names.index(c) for c in contract.KEY_COLUMNS]
    return sum(md.row_group(rg).column(ci).total_compressed_size for rg in range(md.num_row_groups) for ci in key_idx)

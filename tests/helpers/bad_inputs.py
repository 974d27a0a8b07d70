"""The bad-input corpus: every case builds its own inputs and says how it must end.

A :class:`Case` is one defect: the files and request it writes into an
:class:`Estate`, and the outcome the daemon owes it:

* ``failed``: the group fails with ``reason`` (a substring naming the file or
  the problem) in its ``failed/`` record, ``error`` as the record's exception
  class, and one ``throttler_group_failures_total{reason=metric}``;
* ``refused``: the spool refuses the request file before any run: a
  ``failed/`` record with ``reason`` and ``reason_class == metric``, and one
  ``throttler_requests_rejected_total{reason=metric}``;
* ``done``: the input is inside the contract (mixed widths, NaN, an empty file):
  the group succeeds and ``check`` compares its output with a reference.

Cases use the directory catalog unless ``catalog="manifest"``. Group IDs are
the case IDs, so each record names its case. ``tests/cluster/test_bad_input.py``
builds every case into one estate per catalog and runs one real Service over
each.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import WORKER_MEMORY_BYTES
from tests.helpers.datafiles import (
    assert_matches_reference,
    read_output,
    reference_sum,
    write_sim,
)
from throttler.spool.files import safe_name

#: Rows of the file that no worker can hold: the aligned final task alone is
#: priced at 72 B/row (+32 MiB), so this many rows exceed 0.85 x the test
#: workers' memory limit (12M rows, 900 MB, for 1 GB workers), past what one task
#: alone may hold ((0.8 - 0.05) x the limit less the idle RSS) however small the
#: worker's idle RSS. At 0.6 x the limit the case fitted a worker whose idle RSS
#: measured under 70 MB.
HUGE_ROWS = math.ceil(0.85 * WORKER_MEMORY_BYTES / 72 / 1e6) * 1_000_000


class Estate:
    """A data root, an output directory, a spool and a directory outside the data root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data, self.out, self.spool = self.root / "data", self.root / "out", self.root / "spool"
        self.outside = self.root / "outside"  #: sibling of the data root: never readable by groups
        for path in (self.data, self.out, self.outside, *(self.spool / d for d in ("tmp", "incoming"))):
            path.mkdir(parents=True, exist_ok=True)
        self.inputs: dict[str, list[str]] = {}  #: group -> its input files, for reference checks
        self.manifest_rows: list[tuple[str, str]] = []  #: (group_id, file relative to the data root)
        self._drops = itertools.count()

    def sims(self, group: str, n: int = 2, **kw) -> list[str]:
        """``n`` good simulation files ``data/<group>/fNNN.parquet`` (same keys, different values)."""
        folder = self.data / group
        folder.mkdir(exist_ok=True)
        seeds = kw.pop("seeds", range(n))
        paths = [write_sim(folder / f"f{i:03d}.parquet", seed=seed, **kw) for i, seed in enumerate(seeds)]
        self.inputs[group] = paths
        return paths

    def drop(self, name: str | bytes, content: bytes = b"") -> None:
        """A request written in tmp/ and renamed into incoming/, as another program would."""
        raw = os.fsencode(name)
        tmp = os.path.join(os.fsencode(self.spool / "tmp"), f"drop-{next(self._drops)}.tmp".encode())
        with open(tmp, "wb") as fh:
            fh.write(content)
        os.rename(tmp, os.path.join(os.fsencode(self.spool / "incoming"), raw))

    def write_manifest(self) -> Path:
        path = self.root / "manifest.csv"
        lines = ["group_id,file"] + [f"{g},{f}" for g, f in self.manifest_rows]
        path.write_text("\n".join(lines) + "\n")
        return path


@dataclass(frozen=True)
class Case:
    id: str
    outcome: str  #: "failed", "refused" or "done"
    reason: str = ""  #: substring of the record's reason (failed, refused)
    metric: str = ""  #: failure or refusal class
    error: str = ""  #: exception class in a failed group's record
    build: Callable[[Estate, "Case"], None] | None = None  #: writes inputs (and the request, if special)
    request: str | bytes | None = None  #: request file name; default: the case id (a plain-name request)
    content: bytes = b""
    check: Callable[[dict, Estate], None] | None = None  #: extra checks of a done record
    drop: Callable[[Estate, "Case"], None] | None = None  #: puts the request in incoming/ (default: a file)
    catalog: str = "directory"
    notes: str = field(default="", compare=False)

    @property
    def request_name(self) -> str | bytes:
        return self.id if self.request is None else self.request

    @property
    def record_key(self) -> str:
        """How records list this case's request file."""
        return safe_name(os.fsdecode(os.fsencode(self.request_name)))

    def submit(self, estate: Estate) -> None:
        if self.drop is not None:
            self.drop(estate, self)
        else:
            estate.drop(self.request_name, self.content)


CASES: list[Case] = []


def case(id: str, outcome: str, reason: str = "", metric: str = "", error: str = "", **kw):
    """Register the decorated builder as a corpus case."""
    def register(build):
        CASES.append(Case(id, outcome, reason, metric, error, build=build, **kw))
        return build
    return register


def _json(group: str, **fields) -> bytes:
    return json.dumps({"group": group, **fields}).encode()


def _rewrite(path: str, table: pa.Table) -> None:
    pq.write_table(table, path)


def _table(path: str) -> pa.Table:
    return pq.read_table(path)


# --------------------------------------------------------------------------- catalog


@case("unknown-group", "failed", "unknown group 'unknown-group'", "catalog", "CatalogError")
def _(e, c):
    pass  # nothing under data/


@case("empty-group", "failed", "group 'empty-group' has no files", "catalog", "CatalogError")
def _(e, c):
    (e.data / c.id).mkdir()
    (e.data / c.id / "README.txt").write_text("no parquet here\n")


@case("missing-file-link", "failed", "nothere.parquet: file not found", "data", "DataError")
def _(e, c):
    e.sims(c.id, 1)
    os.symlink(e.data / c.id / "nothere.parquet", e.data / c.id / "f001.parquet")  # dangling, inside the root


@case("escaping-symlink", "failed", "outside the data root", "catalog", "CatalogError")
def _(e, c):
    e.sims(c.id, 1)
    secret = write_sim(e.outside / "secret.parquet", seed=5)
    os.symlink(os.path.relpath(secret, e.data / c.id), e.data / c.id / "f001.parquet")


@case("duplicate-symlink", "failed", "f002.parquet are the same file",
      "catalog", "CatalogError", notes="two names, one file: summed once or twice, the output would be a guess")
def _(e, c):
    first, _ = e.sims(c.id, 2)
    os.symlink("f000.parquet", e.data / c.id / "f002.parquet")


@case("escaping-group-dir", "failed", "outside the data root", "catalog", "CatalogError")
def _(e, c):
    (e.outside / "grp").mkdir()
    write_sim(e.outside / "grp" / "f000.parquet", seed=6)
    os.symlink(e.outside / "grp", e.data / c.id)  # the whole group directory points outside


# --------------------------------------------------------------------------- unreadable files


@case("truncated", "failed", "truncated/f001.parquet: cannot read the Parquet footer", "data", "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    raw = Path(bad).read_bytes()
    Path(bad).write_bytes(raw[: len(raw) // 2])


@case("corrupt-page-header", "failed", "corrupt-page-header/f001.parquet: cannot decode", "data", "DataError",
      notes="garbage over the key columns' pages: the footer is intact, decoding fails")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    _garble(bad, "path")


@case("corrupt-values-crc", "failed", "CRC checksum verification failed", "data", "DataError",
      notes="garbage in the middle of the value pages of a file written with page CRCs")
def _(e, c):
    good, bad = e.sims(c.id, 2)
    pq.write_table(_table(bad), bad, write_page_checksum=True)
    _garble(bad, "value")


@case("not-parquet-csv", "failed", "not-parquet-csv/f001.parquet: cannot read the Parquet footer", "data",
      "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    Path(bad).write_text("path,Date,value\n0,2027-01-02,1.5\n1,2027-01-02,2.5\n")


@case("zero-byte-file", "failed", "zero-byte-file/f001.parquet: cannot read the Parquet footer", "data",
      "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    Path(bad).write_bytes(b"")


@case("directory-named-parquet", "failed", "directory-named-parquet/f001.parquet: cannot read", "data",
      "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    os.unlink(bad)
    os.mkdir(bad)  # e.g. a Hive-style dataset directory


def _garble(path: str, column: str) -> None:
    """Overwrite the middle of ``column``'s first column chunk with random bytes."""
    md = pq.read_metadata(path)
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    chunk = md.row_group(0).column(names.index(column))
    start = min(chunk.data_page_offset, chunk.dictionary_page_offset or chunk.data_page_offset)
    middle, half = start + chunk.total_compressed_size // 2, min(100, chunk.total_compressed_size // 3)
    raw = bytearray(Path(path).read_bytes())
    raw[middle - half: middle + half] = np.random.default_rng(1).bytes(2 * half)
    Path(path).write_bytes(bytes(raw))


# --------------------------------------------------------------------------- schema


def _missing(column: str):
    def build(e, c):
        _, bad = e.sims(c.id, 2)
        _rewrite(bad, _table(bad).drop_columns([column]))
    return build


for _col in ("value", "path", "Date"):
    case(f"missing-{_col.lower()}", "failed", f"f001.parquet: missing column(s) {_col}", "data",
         "DataError")(_missing(_col))


def _retyped(column: str, to: pa.DataType):
    def build(e, c):
        _, bad = e.sims(c.id, 2)
        table = _table(bad)
        i = table.schema.get_field_index(column)
        _rewrite(bad, table.set_column(i, column, table.column(column).cast(to, safe=False)))
    return build


case("string-values", "failed", "column 'value' must be float32 or float64, found string", "data",
     "DataError")(_retyped("value", pa.string()))
case("integer-values", "failed", "column 'value' must be float32 or float64, found int64", "data",
     "DataError")(_retyped("value", pa.int64()))
case("float-paths", "failed", "column 'path' must be an integer type, found double", "data",
     "DataError")(_retyped("path", pa.float64()))
case("string-dates", "failed", "column 'Date' must be a date or timestamp, found string", "data",
     "DataError")(_retyped("Date", pa.string()))


@case("null-keys", "failed", "null-keys/f001.parquet: null keys in 'path' or 'Date'", "data", "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    table = _table(bad)
    paths = table.column("path").to_pylist()
    paths[7] = None
    _rewrite(bad, table.set_column(0, "path", pa.array(paths, pa.int64())))


@case("date-out-of-range", "failed", "'Date' out of range for nanosecond timestamps", "data", "DataError")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    table = _table(bad)
    days = table.column("Date").cast(pa.int32()).to_numpy() + 300 * 365  # 2027 + 300 years > 2262
    _rewrite(bad, table.set_column(1, "Date", pa.array(days, pa.date32())))


# --------------------------------------------------------------------------- keys


@case("duplicate-keys-first-file", "failed", "duplicate-keys-first-file/f000.parquet: duplicated key (path=",
      "data", "DataError", notes="aligned: found when the final task decodes the reference keys")
def _(e, c):
    bad, _ = e.sims(c.id, 2)
    _duplicate_a_key(bad)
    pq.write_table(_table(bad), e.inputs[c.id][1])  # same keys in both files: aligned, no fallback


@case("duplicate-keys-second-file", "failed", "duplicate-keys-second-file/f001.parquet: duplicated key",
      "data", "DataError", notes="aligned sees different keys, auto falls back to sum, which finds the duplicate")
def _(e, c):
    _, bad = e.sims(c.id, 2)
    _duplicate_a_key(bad)


def _duplicate_a_key(path: str) -> None:
    """Row 1 repeats row 0's (path, Date): rows are path-major, so only its Date changes."""
    table = _table(path)
    days = table.column("Date").cast(pa.int32()).to_numpy().copy()
    days[1] = days[0]
    _rewrite(path, table.set_column(1, "Date", pa.array(days, pa.date32())))


@case("misaligned-explicit", "failed", "misaligned-explicit/f001.parquet: keys differ from", "data",
      "MisalignedKeys", request="misaligned-explicit.json",
      content=_json("misaligned-explicit", strategy="aligned"))
def _(e, c):
    e.sims(c.id, 2)
    write_sim(e.inputs[c.id][1], seed=9, shuffle=True)  # same rows, another order


@case("empty-file-explicit-aligned", "failed", "0 rows, but", "data", "MisalignedKeys",
      request="empty-file-explicit-aligned.json", content=_json("empty-file-explicit-aligned", strategy="aligned"),
      notes="aligned needs equal row counts: an explicit aligned request fails, auto would pick sum")
def _(e, c):
    _, empty = e.sims(c.id, 2)
    _rewrite(empty, _table(empty).slice(0, 0))


@case("does-not-fit", "failed", "but the largest worker allows", "does_not_fit", "DoesNotFit",
      notes=f"one file of {HUGE_ROWS:,} rows (constant data: 100 KB on disk)")
def _(e, c):
    (e.data / c.id).mkdir()
    chunk = pa.table({"path": pa.array(np.zeros(1_000_000, np.int64)),
                      "Date": pa.array(np.zeros(1_000_000, np.int32), pa.date32()),
                      "value": pa.array(np.zeros(1_000_000))})
    with pq.ParquetWriter(e.data / c.id / "f000.parquet", chunk.schema) as writer:
        for _ in range(HUGE_ROWS // len(chunk)):
            writer.write_table(chunk)


# --------------------------------------------------------------------------- accepted by the contract


def _matches(record: dict, e: Estate) -> None:
    assert_matches_reference(record["output"], e.inputs[record["group"]])


@case("mixed-int-widths", "done", check=_matches)
def _(e, c):
    e.sims(c.id, 3, seeds=(1, 2, 3))
    for path, kind in zip(e.inputs[c.id], (pa.int32(), pa.int64(), pa.int16())):
        table = _table(path)
        _rewrite(path, table.set_column(0, "path", table.column("path").cast(kind)))


@case("mixed-float-widths", "done", check=_matches)
def _(e, c):
    e.sims(c.id, 2)
    write_sim(e.inputs[c.id][0], seed=0, value_type=pa.float32())


def _date_types_check(record: dict, e: Estate) -> None:
    _matches(record, e)
    assert pq.read_schema(record["output"]).field("Date").type == pa.timestamp("ms"), \
        "the output keeps the Date type of the group's first file"


@case("mixed-date-types", "done", check=_date_types_check)
def _(e, c):
    e.sims(c.id, 3)
    kinds = (pa.timestamp("ms"), pa.date32(), pa.timestamp("ns", tz="UTC"))
    for seed, (path, kind) in enumerate(zip(e.inputs[c.id], kinds)):
        write_sim(path, seed=seed, date_type=kind)


def _nan_inf_check(record: dict, e: Estate) -> None:
    got, want = read_output(record["output"]), reference_sum(e.inputs[record["group"]])
    assert record["nan_count"] == 7, record["nan_count"]
    values = got["value"].to_numpy()
    assert values[10] == np.inf and values[20] == -np.inf and np.isnan(values[30]), values[[10, 20, 30]]
    assert np.isfinite(np.delete(values, [10, 20, 30])).all(), "NaN inputs are skipped, not propagated"
    np.testing.assert_allclose(values, want["value"].to_numpy(), rtol=1e-12)


@case("nan-and-infinity", "done", check=_nan_inf_check,
      notes="7 NaN skipped and counted; +inf, -inf summed; inf + -inf = NaN")
def _(e, c):
    first, second = e.sims(c.id, 2)
    for path, patch in ((first, {0: np.nan, 1: np.nan, 2: np.nan, 10: np.inf, 30: np.inf}),
                        (second, {3: np.nan, 4: np.nan, 5: np.nan, 6: np.nan, 20: -np.inf, 30: -np.inf})):
        table = _table(path)
        values = table.column("value").to_numpy().copy()
        for row, value in patch.items():
            values[row] = value
        _rewrite(path, table.set_column(2, "value", pa.array(values)))


def _empty_file_check(record: dict, e: Estate) -> None:
    _matches(record, e)
    assert record["strategy"] == "sum" and record["rows"] == 300 and record["files"] == 3


@case("empty-file-among-others", "done", check=_empty_file_check,
      notes="0 rows contribute nothing to a sum; auto picks sum since row counts differ")
def _(e, c):
    _, empty, _ = e.sims(c.id, 3)
    _rewrite(empty, _table(empty).slice(0, 0))


def _all_empty_check(record: dict, e: Estate) -> None:
    assert record["rows"] == 0 and pq.read_metadata(record["output"]).num_rows == 0
    assert pq.read_schema(record["output"]).names == ["path", "Date", "value"]


@case("all-files-empty", "done", check=_all_empty_check, notes="the sum over no rows: an empty output")
def _(e, c):
    for path in e.sims(c.id, 2):
        _rewrite(path, _table(path).slice(0, 0))


@case("extra-columns", "done", check=_matches)
def _(e, c):
    for path in e.sims(c.id, 2):
        table = _table(path)
        _rewrite(path, table.append_column("note", pa.array(["x"] * len(table))))


# --------------------------------------------------------------------------- manifest catalog


@case("manifest-missing-file", "failed", "manifest-missing-file/nothere.parquet: file not found", "data",
      "DataError", catalog="manifest")
def _(e, c):
    good = e.sims(c.id, 1)[0]
    e.manifest_rows += [(c.id, os.path.relpath(good, e.data)), (c.id, f"{c.id}/nothere.parquet")]


@case("manifest-escaping-entry", "failed", "../outside/secret.parquet resolves to", "catalog", "CatalogError",
      catalog="manifest")
def _(e, c):
    good = e.sims(c.id, 1)[0]
    write_sim(e.outside / "secret.parquet", seed=5)
    e.manifest_rows += [(c.id, os.path.relpath(good, e.data)), (c.id, "../outside/secret.parquet")]


@case("manifest-duplicate-entry", "failed", "are the same file", "catalog", "CatalogError", catalog="manifest")
def _(e, c):
    first, second = (os.path.relpath(p, e.data) for p in e.sims(c.id, 2))
    e.manifest_rows += [(c.id, first), (c.id, second), (c.id, first)]


@case("manifest-absolute-entry", "failed", "outside/absolute.parquet resolves to", "catalog", "CatalogError",
      catalog="manifest", notes="an absolute path in the manifest: data_root / '/x' is '/x'")
def _(e, c):
    e.manifest_rows += [(c.id, str(write_sim(e.outside / "absolute.parquet", seed=7)))]


@case("manifest-unknown-group", "failed", "unknown group 'manifest-unknown-group': not in manifest", "catalog",
      "CatalogError", catalog="manifest")
def _(e, c):
    pass


# --------------------------------------------------------------------------- refused requests


def _refused(id, reason, metric, request, content=b"", drop=None, notes=""):
    CASES.append(Case(id, "refused", reason, metric, request=request, content=content, drop=drop, notes=notes))


_refused("name-dotdot", "invalid group ID 'a..b'", "validation", "a..b")
_refused("name-leading-dot", "invalid group ID '.hidden'", "validation", ".hidden")
_refused("name-leading-dot-json", "invalid request name '.hidden.json'", "validation", ".hidden.json")
_refused("name-escape-sequence", r"invalid group ID 'g\x1b[31m'", "validation", "g\x1b[31m")
_refused("name-newline", r"invalid group ID 'g\n'", "validation", "g\n")
_refused("name-tab", r"invalid group ID 'a\tb'", "validation", "a\tb")
_refused("name-129-chars", "group ID longer than 128 characters", "validation", "n" * 129)
_refused("name-255-bytes", "group ID longer than 128 characters", "validation", "m" * 255,
         notes="too long to take a run prefix in active/: closed in place")
_refused("name-not-utf8", "request name is not valid UTF-8", "validation", b"g\xff\xfe")
_refused("name-non-ascii", "invalid group ID", "validation", "gr\u00e9")
_refused("json-invalid", "invalid JSON", "invalid_json", "bad.json", b"{not json")
_refused("json-not-object", "request JSON must be an object", "invalid_json", "list.json", b'["g"]')
_refused("json-no-group", "request JSON has no group", "invalid_json", "nogroup.json", b'{"priority": 1}')
_refused("json-bad-group", "invalid group ID '../etc'", "validation", "escape.json", b'{"group": "../etc"}')
_refused("json-bad-strategy", "unknown strategy 'fast'", "validation", "fast.json", _json("good", strategy="fast"))
_refused("request-many-megabytes", "request too large", "too_large", "huge.json",
         b'{"group": "good"' + b" " * (5 * 2**20) + b"}")


def _drop_symlink(e, c):
    target = e.outside / "symlink-target"
    target.write_text('{"group": "good"}')
    os.symlink(target, e.spool / "incoming" / c.request)


def _drop_fifo(e, c):
    os.mkfifo(e.spool / "incoming" / c.request)


def _drop_directory(e, c):
    (e.spool / "incoming" / c.request).mkdir()
    (e.spool / "incoming" / c.request / "x").write_text("x")


_refused("request-symlink", "request is a symlink", "symlink", "link.json", drop=_drop_symlink,
         notes="the link's target (outside the spool) is left untouched")
_refused("request-fifo", "request is not a regular file", "other", "fifo", drop=_drop_fifo,
         notes="never opened: opening a FIFO for reading would block the intake")
_refused("request-directory", "request is not a regular file", "other", "somedir", drop=_drop_directory)


# --------------------------------------------------------------------------- a flood of one group

DUPLICATES = 1000  #: requests of the coalescing case


def _drop_duplicates(e, c):
    for i in range(DUPLICATES):
        e.drop(f"dup-{i:04d}.json", _json(c.id))


def _coalesced_check(record: dict, e: Estate) -> None:
    _matches(record, e)
    assert len(record["requests"]) == DUPLICATES and record["coalesced"] == DUPLICATES - 1
    assert sorted(record["requests"]) == [f"dup-{i:04d}.json" for i in range(DUPLICATES)]


@case("coalesced-1000", "done", request="dup-0000.json", check=_coalesced_check, drop=_drop_duplicates,
      notes=f"the same group requested {DUPLICATES} times at once: one run closes every request")
def _(e, c):
    e.sims(c.id, 2)


def build_estate(estate: Estate, cases: list[Case]) -> None:
    """Build every case's inputs, a good group, then drop every request."""
    estate.sims("good", 3, seeds=(11, 12, 13))
    estate.manifest_rows += [("good", os.path.relpath(p, estate.data)) for p in estate.inputs["good"]]
    for c in cases:
        if c.build is not None:
            c.build(estate, c)
    estate.drop("good")
    for c in cases:
        c.submit(estate)

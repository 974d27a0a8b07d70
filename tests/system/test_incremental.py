"""Incremental runs (issue 17): reuse a group's previous output, reading only its new files.

Real Parquet files and a real multi-process LocalCluster; only the pure
decision (:func:`throttler.planning.incremental.decide`) is tested alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.daemon import (
    Daemon,
    make_estate,
    records,
    serve_args,
    throttler_cli,
    wait_closed,
)
from tests.helpers.datafiles import assert_matches_reference, read_output, write_sim
from throttler.errors import MisalignedKeys
from throttler.planning import planner
from throttler.planning.catalog import Catalog
from throttler.planning.incremental import FULL, INCREMENTAL, UNCHANGED, decide
from throttler.planning.plan import Plan
from throttler.service import incremental_run
from throttler.spool.requests import BadRequest, parse_request_json
from throttler.worker import graphs
from throttler.worker.output import output_path_for, sweep_temporaries
from throttler.worker.state import STATE_KEY, OutputState, fingerprint, read_state

RTOL = 1e-12


# ------------------------------------------------------------------ the pure decision


def test_decide_extends_when_every_previous_file_is_unchanged():
    previous = OutputState(files={"g/a": "1:x", "g/b": "2:y"})
    got = decide(previous, {"g/a": "1:x", "g/b": "2:y", "g/c": "3:z"})
    assert (got.kind, got.read) == (INCREMENTAL, ("g/c",))


def test_decide_finds_nothing_to_do_when_no_file_is_new_or_changed():
    previous = OutputState(files={"g/a": "1:x", "g/b": "2:y"})
    got = decide(previous, {"g/b": "2:y", "g/a": "1:x"})
    assert (got.kind, got.reason, got.read) == (UNCHANGED, "no file new or changed since the previous output", ())
    assert decide(previous, {"g/a": "1:x", "g/b": "2:y"}, full_requested=True).kind == FULL


@pytest.mark.parametrize("previous, current, full, reason", [
    (OutputState(files={"g/a": "1:x"}), {"g/a": "1:x"}, True, "full run requested"),
    (None, {"g/a": "1:x"}, False, "the previous output has no valid state"),
    (OutputState(files={"g/a": "1:x", "g/b": "2:y"}), {"g/a": "1:x"}, False,
     "1 file(s) removed since the previous output (e.g. g/b)"),
    (OutputState(files={"g/a": "1:x"}), {"g/a": "1:X", "g/c": "3:z"}, False,
     "1 file(s) changed since the previous output (e.g. g/a)"),
    (OutputState(files={"g/a": "1:x"}, finite=False), {"g/a": "1:x"}, False,
     "the previous output holds NaN or infinite sums"),
    (OutputState(files={"g/a": "1:x"}, version=0), {"g/a": "1:x"}, False,
     "the previous output's state is of another version (0, sum-by-path-date)"),
])
def test_decide_runs_in_full(previous, current, full, reason):
    got = decide(previous, current, full_requested=full)
    assert (got.kind, got.reason, got.read) == (FULL, reason, tuple(current))


def test_a_request_may_ask_for_a_full_run():
    assert parse_request_json(b'{"group": "g", "full": true}') == ("g", None, 0, True)
    assert parse_request_json(b'{"group": "g"}') == ("g", None, 0, False)
    with pytest.raises(BadRequest, match="full must be true or false"):
        parse_request_json(b'{"group": "g", "full": "yes"}')


# ------------------------------------------------------------------ runs on a real cluster


def run_group(client, root: Path, out: Path, group: str, strategy: str, full: bool = False):
    """One run as the service makes it: prepare, plan (small chunks: a real tree), fall back, write."""
    prepared = incremental_run.prepare(Catalog(root).files(group), str(root), output_path_for(out, group), full)
    if prepared.decision.unchanged:
        return prepared.decision
    files = list(prepared.files)
    resolved, _ = planner.resolve_strategy(strategy, files)
    while True:
        plan = Plan(group, resolved, tuple(files), files_per_task=2, fan_in=2, task_peak_bytes=1,
                    group_peak_bytes=1, expansion=1.0)
        try:
            client.compute(graphs.build(plan, prepared.target).final).result()
            break
        except MisalignedKeys:
            resolved = planner.fallback_strategy(resolved, files)
    sweep_temporaries(out, group)
    return prepared.decision


class Estate:
    """One group's directory and two output directories: runs as they come, and full runs."""

    def __init__(self, base: Path, aligned: bool):
        self.root, self.out, self.out_full = base / "data", base / "out", base / "full"
        for d in (self.root / "g", self.out, self.out_full):
            d.mkdir(parents=True)
        self.aligned, self.n, self.width = aligned, 0, 12

    def add(self, seed: int, wider: bool = False) -> None:
        self.width += 4 if wider else 0  # a wider file brings keys no earlier file has
        drop = () if self.aligned else (seed % self.width,)
        write_sim(self.root / "g" / f"f{self.n:02d}.parquet", self.width, 4, seed=seed,
                  shuffle=not self.aligned, drop_paths=drop)
        self.n += 1

    def files(self) -> list[str]:
        return sorted(str(p) for p in (self.root / "g").iterdir())


def _check(client, estate: Estate, strategy: str, expected_kind: str, expected_read: int | None):
    decision = run_group(client, estate.root, estate.out, "g", strategy)
    assert decision.kind == expected_kind, decision
    if expected_read is not None:
        assert len(decision.read) == expected_read
    assert run_group(client, estate.root, estate.out_full, "g", strategy, full=True).kind == FULL
    assert_matches_reference(estate.out / "g.parquet", estate.files(), rtol=RTOL)
    got, want = read_output(estate.out / "g.parquet"), read_output(estate.out_full / "g.parquet")
    assert got["path"].tolist() == want["path"].tolist() and got["Date"].tolist() == want["Date"].tolist()
    scale = abs(want["value"]).clip(lower=1.0)
    assert ((got["value"] - want["value"]).abs() <= RTOL * scale).all()
    assert os.listdir(estate.out) == ["g.parquet"]  # the previous output's link was swept


OPS = st.lists(st.sampled_from(["add", "add_wider", "remove", "rewrite"]), min_size=1, max_size=4)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "not-aligned"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, strategy=st.sampled_from(["auto", "sum", "dense", "groupby"]),
       first=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_incremental_equals_full_as_files_are_added_removed_rewritten(client, aligned, ops, strategy, first, seed):
    with tempfile.TemporaryDirectory() as tmp:
        estate = Estate(Path(tmp), aligned)
        for i in range(first):
            estate.add(seed + i)
        _check(client, estate, strategy, FULL, first)
        for step, op in enumerate(ops, start=1):
            if op.startswith("add"):
                estate.add(seed + 100 * step, wider=op == "add_wider")
                _check(client, estate, strategy, INCREMENTAL, 1)
                continue
            victim = estate.files()[(seed + step) % len(estate.files())]
            if op == "remove" and len(estate.files()) > 1:
                os.unlink(victim)
            else:  # rewrite (or remove of the last file): new values under the same name
                write_sim(victim, estate.width, 4, seed=seed + 100 * step + 1, shuffle=not estate.aligned)
            _check(client, estate, strategy, FULL, len(estate.files()))


def test_a_rewrite_in_place_with_same_size_inode_and_mtime_is_detected(client, tmp_path):
    estate = Estate(tmp_path, aligned=True)
    for seed in range(2):
        estate.add(seed)
    target = estate.files()[0]
    _check(client, estate, "auto", FULL, 2)
    before = os.stat(target)
    replacement = write_sim(tmp_path / "other.parquet", estate.width, 4, seed=99)
    assert os.path.getsize(replacement) == before.st_size  # same shape, same writer: same size
    with open(target, "r+b") as fh:  # the same inode, overwritten in place
        fh.write(Path(replacement).read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    decision = run_group(client, estate.root, estate.out, "g", "auto")
    assert (decision.kind, decision.reason) == (FULL, f"1 file(s) changed since the previous output (e.g. g/{Path(target).name})")
    assert_matches_reference(estate.out / "g.parquet", estate.files(), rtol=RTOL)


def test_the_state_lives_in_the_output_footer_and_an_output_without_it_runs_in_full(client, tmp_path):
    estate = Estate(tmp_path, aligned=False)
    estate.add(1)
    run_group(client, estate.root, estate.out, "g", "auto")
    output = estate.out / "g.parquet"
    state = read_state(str(output))
    assert state == OutputState(files={"g/f00.parquet": fingerprint(estate.files()[0])})
    table = pq.read_table(output)
    assert set(pq.read_metadata(output).metadata) >= {STATE_KEY}
    pq.write_table(table.replace_schema_metadata({}), output)  # the same sums, no state
    estate.add(2)
    decision = run_group(client, estate.root, estate.out, "g", "auto")
    assert (decision.kind, decision.reason) == (FULL, "the previous output has no valid state")
    pq.write_table(table.replace_schema_metadata({STATE_KEY: b"{not json"}), output)
    assert run_group(client, estate.root, estate.out, "g", "auto").reason == "the previous output has no valid state"


def test_an_output_holding_nan_is_not_extended(client, tmp_path):
    (tmp_path / "data" / "g").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    for name, value in (("a", float("inf")), ("b", float("-inf"))):  # inf + -inf: a NaN sum
        pq.write_table(pa.table({"path": [1], "Date": pa.array([0], pa.date32()), "value": [value]}),
                       tmp_path / "data" / "g" / f"{name}.parquet")
    run_group(client, tmp_path / "data", tmp_path / "out", "g", "sum")
    assert read_state(str(tmp_path / "out" / "g.parquet")).finite is False
    shutil.copy(tmp_path / "data" / "g" / "a.parquet", tmp_path / "data" / "g" / "c.parquet")
    decision = run_group(client, tmp_path / "data", tmp_path / "out", "g", "sum")
    assert (decision.kind, decision.reason) == (FULL, "the previous output holds NaN or infinite sums")


# ------------------------------------------------------------------ throttler run, end to end


def test_throttler_run_again_after_a_file_lands_reads_only_that_file(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    (root / "g").mkdir(parents=True)
    for i in range(3):
        write_sim(root / "g" / f"f{i}.parquet", 2_000, 30, seed=i)
    args = ["--data-root", str(root), "--output", str(out), "--workers", "1", "--quiet"]
    first = throttler_cli("run", "g", *args, timeout_seconds=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "full (no previous output): 3 files read" in first.stdout
    write_sim(root / "g" / "f3.parquet", 2_000, 30, seed=3)
    second = throttler_cli("run", "g", *args, timeout_seconds=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"^ok     g: 60,000 rows from 4 files in [\d.]+ s \(aligned, incremental: 1 file read, ",
                     second.stdout, re.MULTILINE), second.stdout
    assert_matches_reference(out / "g.parquet", sorted(str(p) for p in (root / "g").iterdir()), rtol=RTOL)
    forced = throttler_cli("run", "g", "--full", *args, timeout_seconds=120)
    assert "full (full run requested): 4 files read" in forced.stdout, forced.stdout + forced.stderr
    before, written = (out / "g.parquet").read_bytes(), os.stat(out / "g.parquet")
    again = throttler_cli("run", "g", *args, timeout_seconds=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"ok     g: 60,000 rows from 4 files (unchanged: no file new or changed, 0 files read, output "
            f"untouched) -> {out / 'g.parquet'}") in again.stdout, again.stdout
    after = os.stat(out / "g.parquet")
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert (out / "g.parquet").read_bytes() == before and os.listdir(out) == ["g.parquet"]


def test_the_daemon_records_a_request_with_nothing_new_as_unchanged_and_leaves_the_output(tmp_path):
    root, out, spool = tmp_path / "data", tmp_path / "out", tmp_path / "spool"
    make_estate(root, {"g": 2}, n_paths=500, n_dates=10)
    daemon = Daemon(serve_args(tmp_path), tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        assert throttler_cli("submit", "g", "--spool", str(spool)).returncode == 0
        wait_closed(spool, 1, 120, daemon)
        [first] = records(spool, "done")
        written = os.stat(out / "g.parquet")
        before = (out / "g.parquet").read_bytes()
        assert throttler_cli("submit", "g", "--spool", str(spool)).returncode == 0
        wait_closed(spool, 2, 120, daemon)
    finally:
        daemon.kill()
    [second] = [r for r in records(spool, "done") if r != first]
    assert (first["run_kind"], first["files_read"]) == ("full", 2), first
    assert {k: second[k] for k in ("group", "output", "rows", "files", "bytes", "bytes_written", "run_kind",
                                   "run_reason", "files_read", "strategy")} == {
        "group": "g", "output": str(out / "g.parquet"), "rows": 5_000, "files": 2, "bytes": 0, "bytes_written": 0,
        "run_kind": "unchanged", "run_reason": "no file new or changed since the previous output", "files_read": 0,
        "strategy": "none"}
    after = os.stat(out / "g.parquet")
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert (out / "g.parquet").read_bytes() == before and os.listdir(out) == ["g.parquet"]


# ------------------------------------------------------------------ serve --watch


def _land(*paths: Path, seed: int) -> None:
    """Files written under dot-names, then renamed into place (as a writer for --watch should)."""
    hidden = [path.with_name(f".{path.name}.tmp") for path in paths]
    for i, path in enumerate(hidden):
        write_sim(path, 500, 10, seed=seed + i)
    for path, final in zip(hidden, paths):
        os.rename(path, final)


def test_serve_watch_queues_a_group_when_its_files_change_and_reads_only_the_new_file(tmp_path):
    root, out, spool = tmp_path / "data", tmp_path / "out", tmp_path / "spool"
    (root / "g").mkdir(parents=True)
    daemon = Daemon(serve_args(tmp_path, None, "--watch", "--watch-debounce-seconds", "0.3"), tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        _land(root / "g" / "f0.parquet", root / "g" / "f1.parquet", seed=0)
        wait_closed(spool, 1, 120, daemon)
        [first] = records(spool, "done")
        _land(root / "g" / "f2.parquet", seed=2)
        wait_closed(spool, 2, 120, daemon)
    finally:
        daemon.kill()
    [second] = [r for r in records(spool, "done") if r != first]
    assert (first["group"], first["run_kind"], first["files_read"], first["files"]) == ("g", "full", 2, 2), first
    assert (second["group"], second["run_kind"], second["files_read"], second["files"]) == ("g", "incremental", 1, 3)
    assert records(spool, "failed") == []
    assert_matches_reference(out / "g.parquet", sorted(str(p) for p in (root / "g").iterdir()), rtol=RTOL)
    assert "g: files changed; queued" in daemon.log()


def test_serve_watch_is_refused_with_a_manifest(tmp_path):
    (tmp_path / "data" / "g").mkdir(parents=True)
    write_sim(tmp_path / "data" / "g" / "f.parquet", 10, 2)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("group_id,file\ng,g/f.parquet\n")
    done = throttler_cli("serve", *serve_args(tmp_path), "--manifest", str(manifest), "--watch")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "throttler: --watch needs a local data root whose groups are directories" in done.stderr

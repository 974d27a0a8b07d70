"""The spool: durable submit, atomic claim, coalescing, refusals, recovery, watching.

Everything runs on real files under tmp_path; nothing is mocked but the inotify
observer in the fallback test.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import throttler.spool.watcher as spool_mod
from throttler.errors import RequestError
from throttler.spool.queue import Spool
from throttler.spool.requests import check_name, parse_request_json, validate_group
from throttler.spool.watcher import SpoolWatcher


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool").ensure()


def records(spool, kind):
    """Every record of ``kind``, parsed."""
    folder = spool.root / kind
    return [json.loads((folder / name).read_text()) for name in sorted(os.listdir(folder))]


def closed_requests(spool):
    """Every request name closed by any record, with repeats (to check exactly-once)."""
    return [name for kind in ("done", "failed") for rec in records(spool, kind) for name in rec["requests"]]


def put(spool, name, content=b""):
    """Drop a raw request file into incoming/ (name may be bytes)."""
    folder = os.fsencode(spool.root / "incoming")
    fd = os.open(os.path.join(folder, os.fsencode(name)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def only_refusal(spool):
    """Scan, expect nothing runnable, and return the single failed record."""
    assert spool.scan() == []
    assert os.listdir(spool.root / "incoming") == []
    assert os.listdir(spool.root / "active") == []
    (rec,) = records(spool, "failed")
    assert rec["requests"] == [rec["request"]]
    return rec


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize("group", ["G1", "a", "run_2024-01.v2", "0" * 128, "A.b-c_d"])
def test_valid_groups(group):
    assert validate_group(group) == group


@pytest.mark.parametrize(
    "group",
    ["", ".", "..", "a..b", ".hidden", "a/b", "../x", "a\x00b", "a\nb", "a\tb", "G1\n", "x" * 129,
     "-x", "_x", "é", "a b", None, 5, b"G1"],
)
def test_invalid_groups(group):
    with pytest.raises(RequestError):
        validate_group(group)


@given(st.text(max_size=200))
def test_validator_only_accepts_safe_names(text):
    try:
        validate_group(text)
    except RequestError:
        return
    assert "/" not in text and not text.startswith(".") and len(text) <= 128
    assert text.isascii() and text.isprintable() and " " not in text


def test_request_names():
    assert check_name("G1") is False
    assert check_name("anything-1.json") is True
    for bad in ["..", ".x.json", "a b.json", ".json", os.fsdecode(b"\xff\xfe")]:
        with pytest.raises(RequestError):
            check_name(bad)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "must be an object"),
        (b'{"strategy": "sum"}', "no group"),
        (b'{"group": 7}', "group ID must be a string"),
        (b'{"group": "../etc"}', "invalid group ID"),
        (b'{"group": "G", "priority": "high"}', "priority must be an integer"),
        (b'{"group": "G", "priority": true}', "priority must be an integer"),
        (b'{"group": "G", "priority": 1.5}', "priority must be an integer"),
        (b'{"group": "G", "priority": 99999999999}', "priority must be an integer"),
        (b'{"group": "G", "strategy": "fast"}', "unknown strategy"),
        (b'{"group": "G", "strategy": 1}', "unknown strategy"),
        (b'{"group": "G", "prio": 1}', "unknown keys"),
        (b'{"group": "G", "group": "H"}', "duplicate key"),
        (b'{"group": "G", "priority": NaN}', "invalid JSON"),
        (b"\xff\xfe{}", "invalid JSON"),
        (b"[" * 20000, "invalid JSON"),
    ],
)
def test_bad_json_is_refused(spool, content, reason):
    with pytest.raises(RequestError, match=reason):
        parse_request_json(content)
    put(spool, "req.json", content)
    rec = only_refusal(spool)
    assert reason in rec["reason"] and rec["request"] == "req.json"


def test_refusal_keeps_the_group_when_known(spool):
    put(spool, "r.json", b'{"group": "G7", "strategy": "fast"}')
    rec = only_refusal(spool)
    assert rec["group"] == "G7" and "unknown strategy" in rec["reason"]


def test_submit_validates_before_writing(spool):
    bad = [{"group": ".."}, {"group": "a/b"}, {"group": "G", "strategy": "x"}]
    for kwargs in bad + [{"group": "G", "priority": "1"}]:
        with pytest.raises(RequestError):
            spool.submit(**kwargs)
    assert os.listdir(spool.root / "incoming") == [] and os.listdir(spool.root / "tmp") == []


# -- round trip ---------------------------------------------------------------


def test_layout_modes(spool):
    for name in ("tmp", "incoming", "active", "done", "failed", "state"):
        assert stat.S_IMODE(os.stat(spool.root / name).st_mode) == 0o750
    assert spool.state_dir == spool.root / "state"


def test_submit_scan_claim_finish(spool):
    path = spool.submit("G1", priority=3, strategy="sum")
    assert path.parent == spool.root / "incoming" and path.name.startswith("G1.") and path.suffix == ".json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert json.loads(path.read_text()) == {"group": "G1", "strategy": "sum", "priority": 3}
    assert os.listdir(spool.root / "tmp") == []

    (request,) = spool.scan()
    assert (request.name, request.group, request.strategy, request.priority, request.queued) == (
        path.name, "G1", "sum", 3, 1)
    claim = spool.claim(request)
    assert claim.group == "G1" and claim.strategy == "sum" and claim.priority == 3
    assert claim.requests == [path.name] and claim.coalesced == 0
    assert spool.counts() == {"incoming": 0, "active": 1, "done": 0, "failed": 0}

    out = spool.finish(claim, "done", {"output": "/data/out/G1.parquet", "strategy": "aligned",
                                       "requests": ["forged"], "run": "forged"})
    assert out == spool.root / "done" / f"{claim.run_id}.json"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    rec = json.loads(out.read_text())
    assert rec["group"] == "G1" and rec["run"] == claim.run_id and rec["output"] == "/data/out/G1.parquet"
    assert rec["requests"] == [path.name] and rec["coalesced"] == 0  # not forgeable by the caller
    assert rec["strategy"] == "aligned" and rec["requested_strategy"] == "sum"  # the caller's wins
    assert rec["finished_unix_seconds"] >= rec["claimed_unix_seconds"]
    assert os.listdir(spool.root / "active") == [] and os.listdir(spool.root / "tmp") == []
    assert spool.counts() == {"incoming": 0, "active": 0, "done": 1, "failed": 0}
    with pytest.raises(RuntimeError):
        spool.finish(claim, "done", {})


def test_plain_named_request(spool):
    put(spool, "G2", b"any content is ignored")
    (request,) = spool.scan()
    assert (request.group, request.strategy, request.priority) == ("G2", None, 0)  # None: the daemon's default strategy
    claim = spool.claim(request)
    spool.finish(claim, "failed", {"reason": "boom"})
    (rec,) = records(spool, "failed")
    assert rec["requests"] == ["G2"] and rec["reason"] == "boom"


def test_scan_order(spool):
    a, _, c = spool.submit("A"), spool.submit("B", priority=5), spool.submit("C")
    os.utime(a, ns=(1_000, 1_000))
    os.utime(c, ns=(2_000, 2_000))
    assert [r.group for r in spool.scan()] == ["B", "A", "C"]


def test_counts_of_a_missing_spool(tmp_path):
    assert Spool(tmp_path / "nowhere").counts() == {"incoming": 0, "active": 0, "done": 0, "failed": 0}


def test_write_record_rejects_unknown_kind(spool):
    with pytest.raises(ValueError):
        spool.write_record("maybe", {"group": "G"})


# -- claiming races -----------------------------------------------------------


def test_two_threads_race_for_one_request(spool):
    for round_ in range(30):
        spool.submit(f"R{round_}")
        (request,) = spool.scan()
        rivals = [Spool(spool.root), Spool(spool.root)]
        barrier, wins = threading.Barrier(2), []

        def grab(rival):
            barrier.wait()
            wins.append(rival.claim(request))

        threads = [threading.Thread(target=grab, args=(r,)) for r in rivals]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w in wins if w is not None]
        assert len(winners) == 1
        assert len(os.listdir(spool.root / "active")) == 1  # the loser left no run directory
        rivals[wins.index(winners[0])].finish(winners[0], "done", {})
    assert sorted(closed_requests(spool)) == sorted(rec["requests"][0] for rec in records(spool, "done"))


def _claim_everything(root: str, start_at: float) -> list[str]:
    """Child process: scan and claim all it can once the start time comes."""
    rival = Spool(root)
    time.sleep(max(0.0, start_at - time.time()))
    return [claim.group for req in rival.scan() if (claim := rival.claim(req)) is not None]


def test_two_processes_race(spool):
    groups = [f"P{i}" for i in range(60)]
    for group in groups:
        spool.submit(group)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        start_at = time.time() + 2.0
        results = pool.starmap(_claim_everything, [(str(spool.root), start_at)] * 2)
    assert sorted(results[0] + results[1]) == sorted(groups)  # each claimed by exactly one
    assert set(results[0]).isdisjoint(results[1])
    assert len(os.listdir(spool.root / "active")) == len(groups)


# -- coalescing ---------------------------------------------------------------


def test_thousand_submits_make_one_run(spool):
    names = {spool.submit("G").name for _ in range(1000)}
    assert len(names) == 1000
    (request,) = spool.scan()
    assert request.queued == 1000
    claim = spool.claim(request)
    assert claim.coalesced == 999 and os.listdir(spool.root / "incoming") == []
    spool.finish(claim, "done", {})
    (rec,) = records(spool, "done")
    assert rec["coalesced"] == 999 and sorted(rec["requests"]) == sorted(names)
    assert sorted(closed_requests(spool)) == sorted(names)  # every request closed exactly once


def test_requests_while_running_join_the_run(spool):
    first = spool.submit("G", priority=1)
    (request,) = spool.scan()
    claim = spool.claim(request)
    late = [spool.submit("G"), spool.submit("G", priority=9)]
    put(spool, "G")
    assert spool.scan() == []  # all three absorbed into the running run
    assert spool.claim(request) is None  # a stale request: already gone
    spool.finish(claim, "done", {})
    (rec,) = records(spool, "done")
    assert sorted(rec["requests"]) == sorted([first.name, "G"] + [p.name for p in late])
    assert rec["coalesced"] == 3

    again = spool.submit("G")  # after the run ended: runs again
    (request,) = spool.scan()
    second = spool.claim(request)
    assert second.run_id != claim.run_id and second.requests == [again.name]


def test_claim_of_a_duplicate_returns_none(spool):
    spool.submit("G")
    spool.submit("H")
    reqs = {r.group: r for r in spool.scan()}
    claim = spool.claim(reqs["G"])
    spool.submit("G")
    dup = [r for r in spool.scan() if r.group == "G"]
    assert dup == []
    assert spool.claim(reqs["H"]).group == "H"
    assert len(claim.files) == 2


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, reason",
    [
        (".hidden", "invalid group ID"),
        ("..x", "invalid group ID"),
        ("a\x01b", "invalid group ID"),
        ("a\nb", "invalid group ID"),
        ("x" * 129, "longer than 128"),
        ("a..b", "invalid group ID"),
        ("a b.json", "invalid request name"),
        ("a" * 245 + ".json", "invalid request name"),
        (b"G\xff\xfe", "not valid UTF-8"),
    ],
)
def test_bad_names_are_refused(spool, name, reason):
    put(spool, name)
    rec = only_refusal(spool)
    assert reason in rec["reason"]
    assert rec["group"] is None
    if isinstance(name, bytes):
        assert rec["request"] == "G\\xff\\xfe"
    else:
        assert rec["request"] == name


def test_symlink_is_refused_and_not_followed(spool, tmp_path):
    target = tmp_path / "precious.json"
    target.write_text('{"group": "G"}')
    os.symlink(target, spool.root / "incoming" / "G")
    os.symlink(target, spool.root / "incoming" / "x.json")
    assert spool.scan() == []
    rec1, rec2 = records(spool, "failed")
    assert rec1["reason"] == rec2["reason"] == "request is a symlink"
    assert target.read_text() == '{"group": "G"}'  # target untouched
    assert os.listdir(spool.root / "incoming") == [] and os.listdir(spool.root / "active") == []


def test_fifo_is_refused_without_blocking(spool):
    os.mkfifo(spool.root / "incoming" / "G3")
    rec = only_refusal(spool)
    assert rec["reason"] == "request is not a regular file"


def test_directory_is_refused_and_removed(spool):
    (spool.root / "incoming" / "G4").mkdir()
    (spool.root / "incoming" / "G4" / "inner").write_text("x")
    rec = only_refusal(spool)
    assert rec["reason"] == "request is not a regular file"


def test_large_request_is_refused(spool):
    put(spool, "big.json", b" " * (1 << 20))
    rec = only_refusal(spool)
    assert rec["reason"] == "request too large"


def test_claim_reinspects_a_request_swapped_after_scan(spool, tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep")
    put(spool, "a.json", b'{"group": "G"}')
    put(spool, "b.json", b'{"group": "H"}')
    reqs = {r.name: r for r in spool.scan()}
    os.unlink(spool.root / "incoming" / "a.json")
    os.symlink(target, spool.root / "incoming" / "a.json")
    os.unlink(spool.root / "incoming" / "b.json")
    put(spool, "b.json", b'{"group": "K"}')
    assert spool.claim(reqs["a.json"]) is None and spool.claim(reqs["b.json"]) is None
    reasons = sorted(rec["reason"] for rec in records(spool, "failed"))
    assert reasons == ["request changed while queued", "request is a symlink"]
    assert target.read_text() == "keep"
    assert os.listdir(spool.root / "incoming") == [] and os.listdir(spool.root / "active") == []


def test_foreign_owner_is_refused(tmp_path):
    other = Spool(tmp_path / "s", allowed_uids={os.geteuid() + 4242}).ensure()
    other.submit("G")
    rec = only_refusal(other)
    assert "not allowed" in rec["reason"]
    mine = Spool(tmp_path / "s", allowed_uids=Spool.default_uids())
    mine.submit("G")
    assert [r.group for r in mine.scan()] == ["G"]


# -- release and recovery -----------------------------------------------------


def test_release_puts_requests_back(spool):
    p = spool.submit("G")
    put(spool, "G")
    claim = spool.claim(spool.scan()[0])
    assert spool.release(claim) == 2
    assert sorted(os.listdir(spool.root / "incoming")) == sorted([p.name, "G"])
    assert os.listdir(spool.root / "active") == []
    assert spool.scan()[0].queued == 2


def test_recover_requeues_an_unrecorded_run(spool):
    p = spool.submit("G")
    put(spool, "G")
    spool.claim(spool.scan()[0])  # then the daemon "crashes"
    put(spool, "G")  # a new plain request with the same name arrived meanwhile
    restarted = Spool(spool.root)
    assert restarted.recover() == {"requeued": 2, "closed": 0}
    assert os.listdir(spool.root / "active") == []
    incoming = os.listdir(spool.root / "incoming")
    assert p.name in incoming and "G" in incoming and len(incoming) == 3  # G clash became JSON
    (request,) = restarted.scan()
    claim = restarted.claim(request)
    restarted.finish(claim, "done", {})
    assert len(closed_requests(restarted)) == 3 and records(restarted, "failed") == []


def test_recover_keeps_both_of_two_same_named_json_requests(spool):
    put(spool, "x.json", b'{"group": "G", "priority": 4}')
    spool.claim(spool.scan()[0])  # crash
    put(spool, "x.json", b'{"group": "G"}')
    assert Spool(spool.root).recover() == {"requeued": 1, "closed": 0}
    incoming = sorted(os.listdir(spool.root / "incoming"))
    assert len(incoming) == 2 and "x.json" in incoming
    (request,) = Spool(spool.root).scan()
    assert request.queued == 2 and request.priority == 4  # content kept under the new name


def test_recover_closes_a_recorded_run(spool):
    spool.submit("G")
    spool.submit("G")
    claim = spool.claim(spool.scan()[0])
    # crash between the durable record and the removal of the active files:
    spool.write_record("done", {**claim.describe(), "output": "x"}, name=f"{claim.run_id}.json")
    restarted = Spool(spool.root)
    assert restarted.recover() == {"requeued": 0, "closed": 1}
    assert os.listdir(spool.root / "active") == [] and os.listdir(spool.root / "incoming") == []
    assert len(records(spool, "done")) == 1 and len(closed_requests(spool)) == 2


def test_recover_cleans_stale_tmp(spool):
    old, fresh = spool.root / "tmp" / "old", spool.root / "tmp" / "fresh"
    old.write_text("x")
    fresh.write_text("x")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    spool.recover()
    assert os.listdir(spool.root / "tmp") == ["fresh"]


# -- watching -----------------------------------------------------------------


def test_watcher_wakes_on_new_request(spool):
    wake = threading.Event()
    watcher = SpoolWatcher(spool, wake, rescan_seconds=60)
    watcher.start()
    try:
        assert watcher.watching
        time.sleep(0.1)
        wake.clear()
        spool.submit("G")
        assert wake.wait(1.0)
        wake.clear()
        spool.scan()  # the daemon reading incoming/ must not wake itself
        assert not wake.wait(0.3)
    finally:
        watcher.stop()
    assert not watcher.watching


class _BrokenObserver:
    def schedule(self, *args, **kwargs):
        pass

    def start(self):
        raise OSError(28, "inotify watch limit reached")


def test_rescan_catches_requests_without_inotify(spool, monkeypatch, caplog):
    monkeypatch.setattr(spool_mod, "Observer", _BrokenObserver)
    wake = threading.Event()
    watcher = SpoolWatcher(spool, wake, rescan_seconds=0.1)
    with caplog.at_level(logging.WARNING, logger="throttler.spool.queue"):
        watcher.start()
    try:
        assert not watcher.watching
        assert "rescanning every" in caplog.text
        wake.clear()
        spool.submit("G")
        assert wake.wait(1.0)
        assert [r.group for r in spool.scan()] == ["G"]
    finally:
        watcher.stop()

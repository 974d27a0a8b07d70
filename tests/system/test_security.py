"""Security: what the daemon exposes, what it trusts in a request, and the files it creates.

* the metrics endpoint binds to loopback unless told otherwise;
* records and outputs carry no world permission bits, whatever the umask;
* the spool refuses symlinks and requests owned by users not allowed;
* a group can only write its own output; group IDs never leave the roots;
* nothing in a request is unpickled or evaluated (JSON only, known keys only).

The daemon-level tests run ``throttler serve`` as a real process against the
session's cluster; the rest drive the real Service or the spool directly.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import socket
import stat
import urllib.request
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.helpers.daemon import Daemon, leaked_processes
from tests.helpers.datafiles import assert_matches_reference, write_sim
from tests.cluster.test_service import (
    drop_request,
    make_service,
    records,
    run_service_until_settled,
)
from throttler.config import DEFAULTS, load
from throttler.errors import RequestError
from throttler.groupid import validate_group
from throttler.ops.metrics import Metrics, parse_address
from throttler.spool.queue import Spool
from throttler.worker.output import TMP_SUFFIX, output_path_for

PACKAGE = Path(__file__).resolve().parents[2] / "throttler"
FOREIGN_UID = 4242  #: a uid that is neither root nor us


def world_bits(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode) & 0o007


def sims(root: Path, group: str, n: int = 2) -> list[str]:
    (root / group).mkdir(parents=True, exist_ok=True)
    return [write_sim(root / group / f"f{i:03d}.parquet", seed=i + len(group)) for i in range(n)]


class Payload:
    """Unpickling this would create ``marker``: proof that nothing unpickles requests."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- the network


def test_metrics_default_address_is_loopback():
    assert parse_address(DEFAULTS.metrics_address)[0] == "127.0.0.1"
    assert load(environ={}).metrics_address == DEFAULTS.metrics_address
    assert parse_address(":9464") == ("127.0.0.1", 9464), "an empty host means loopback, not every interface"


@pytest.mark.parametrize("address", ["127.0.0.1:0", ":0"])
def test_metrics_server_listens_on_loopback_only(address):
    server, _thread, port = Metrics().serve(address)
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"throttler_requests_received_total" in response.read()
        for ip in _other_ipv4_addresses():
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
    finally:
        server.shutdown()
        server.server_close()


def test_embedded_cluster_listens_on_loopback_only(dask_cluster):
    """The embedded scheduler and workers (and the dashboard it still starts) are not on the network."""
    cluster, _ = dask_cluster
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    me = psutil.Process()
    workers = [p for p in me.children(recursive=True) if "multiprocessing" in " ".join(p.cmdline())]
    assert len(workers) >= 2
    listening = [(p.pid, c.laddr) for p in [me, *workers] for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in ("127.0.0.1", "::1") for _, addr in listening), listening


def _other_ipv4_addresses() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


# --------------------------------------------------------------------------- the files it creates


def test_records_and_outputs_have_no_world_bits(tmp_path, client):
    make = sims(tmp_path / "data", "good")
    service, spool, _ = make_service(tmp_path, client)
    drop_request(spool.root, "good")
    drop_request(spool.root, "missing-group")
    drop_request(spool.root, ".refused")
    old = os.umask(0)  # the most permissive umask: modes must not come from it
    try:
        run_service_until_settled(service, spool, 3)
    finally:
        os.umask(old)
    (done,) = records(spool.root, "done")
    assert_matches_reference(done["output"], make)
    created = [done["output"], *(spool.root / kind / n for kind in ("done", "failed")
                                 for n in os.listdir(spool.root / kind))]
    assert len(created) == 4  # an output, a done record, a group failure and a refusal
    assert {str(p): oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in created if world_bits(p)} == {}
    for name in ("tmp", "incoming", "active", "done", "failed", "state"):
        assert world_bits(spool.root / name) == 0, name
    for name in os.listdir(spool.state_dir):
        assert world_bits(spool.state_dir / name) == 0, name


# --------------------------------------------------------------------------- who may submit


def test_spool_refuses_a_symlinked_request_and_leaves_its_target_alone(tmp_path):
    refused = []
    spool = Spool(tmp_path / "spool", on_refused=refused.append).ensure()
    target = tmp_path / "precious.json"
    target.write_text('{"group": "g1"}')
    os.chmod(target, 0o600)
    before = os.stat(target)
    os.symlink(target, spool.root / "incoming" / "evil.json")
    assert spool.scan() == []
    (rec,) = records(spool.root, "failed")
    assert rec["reason"] == "request is a symlink" and rec["reason_class"] == "symlink"
    assert refused == ["symlink"]
    after = os.stat(target)
    assert target.read_text() == '{"group": "g1"}'
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (before.st_mode, before.st_size, before.st_mtime_ns)
    assert os.listdir(spool.root / "incoming") == [] and os.listdir(spool.root / "active") == []


def test_spool_refuses_requests_of_users_not_allowed(tmp_path):
    refused = []
    spool = Spool(tmp_path / "spool", allowed_uids={os.geteuid() + FOREIGN_UID}, on_refused=refused.append).ensure()
    drop_request(spool.root, "g1")
    assert spool.scan() == []
    (rec,) = records(spool.root, "failed")
    assert rec["reason"] == f"request owned by uid {os.geteuid()}, which is not allowed"
    assert rec["reason_class"] == "ownership" and refused == ["ownership"]


def test_strict_owner_set_refuses_a_foreign_owned_request(tmp_path):
    """With the strict set (root and the daemon's user), another user's file is refused."""
    spool = Spool(tmp_path / "spool", allowed_uids=Spool.default_uids()).ensure()
    drop_request(spool.root, "g1")
    drop_request(spool.root, "g2")
    os.chown(spool.root / "incoming" / "g2", FOREIGN_UID, FOREIGN_UID)  # the tests run as root
    assert [r.group for r in spool.scan()] == ["g1"]
    (rec,) = records(spool.root, "failed")
    assert rec["request"] == "g2" and f"uid {FOREIGN_UID}" in rec["reason"]


# --------------------------------------------------------------------------- outputs and paths


@pytest.mark.parametrize("group", ["a/../b", "../b", "b/../../x", "/b", ".b", "..", "b\x00", "b/"])
def test_group_ids_naming_another_path_are_refused(group):
    with pytest.raises(RequestError):
        validate_group(group)


def test_a_group_only_writes_its_own_output(tmp_path, client):
    """``b.parquet`` is a valid group ID: its output is ``b.parquet.parquet``, never b's."""
    b, b_parquet = sims(tmp_path / "data", "b"), sims(tmp_path / "data", "b.parquet", 3)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    service, spool, _ = make_service(tmp_path, client)
    os.symlink(outside, tmp_path / "out" / "victim.parquet")  # planted where a group's output goes
    sims(tmp_path / "data", "victim")
    for name in ("b", "b.parquet", "victim", "a..b"):
        drop_request(spool.root, name)
    run_service_until_settled(service, spool, 4)
    done = {r["group"]: r["output"] for r in records(spool.root, "done")}
    assert done == {"b": str(tmp_path / "out" / "b.parquet"),
                    "b.parquet": str(tmp_path / "out" / "b.parquet.parquet"),
                    "victim": str(tmp_path / "out" / "victim.parquet")}
    assert_matches_reference(done["b"], b)
    assert_matches_reference(done["b.parquet"], b_parquet)
    assert outside.read_text() == "keep me", "the output replaced the symlink, never wrote through it"
    assert stat.S_ISREG(os.lstat(done["victim"]).st_mode)
    (failed,) = records(spool.root, "failed")
    assert failed["request"] == "a..b" and "invalid group ID" in failed["reason"]


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
def test_every_valid_group_id_stays_a_direct_child_of_the_roots(text):
    try:
        validate_group(text)
    except RequestError:
        return
    out = Path("/srv/out")
    path = Path(output_path_for(out, text))
    assert path.parent == out and path.name == f"{text}.parquet"
    assert (Path("/srv/data") / text).parent == Path("/srv/data")
    assert not path.name.startswith(".") or not path.name.endswith(TMP_SUFFIX), \
        "no output can be mistaken for a temporary and swept"


# --------------------------------------------------------------------------- nothing is evaluated


@pytest.mark.parametrize("content, reason", [
    (pickle.dumps(Payload("MARKER")), "invalid JSON"),
    (b'{"group": "good", "__reduce__": "os.system", "cmd": "touch MARKER"}', "unknown keys in request"),
    (b'{"group": "good", "strategy": "auto; touch MARKER"}', "unknown strategy"),
    (b'{"group": "good; touch MARKER"}', "invalid group ID"),
    (b'{"group": "$(touch MARKER)"}', "invalid group ID"),
    (b"{'group': 'good'}", "invalid JSON"),  # a Python literal: never literal_eval'd
    (b'{"group": "good", "priority": 1e400}', "priority must be an integer"),
    (b'!!python/object/apply:os.system ["touch MARKER"]', "invalid JSON"),  # YAML tags mean nothing
], ids=["pickle", "extra-keys", "strategy-shell", "group-shell", "group-subshell", "python-literal",
        "priority-inf", "yaml-tag"])
def test_request_content_is_never_evaluated(tmp_path, monkeypatch, content, reason):
    monkeypatch.chdir(tmp_path)
    content = content.replace(b"MARKER", str(tmp_path / "pwned").encode())
    spool = Spool(tmp_path / "spool").ensure()
    drop_request(spool.root, "req.json", content)
    assert spool.scan() == []
    (rec,) = records(spool.root, "failed")
    assert reason in rec["reason"] and rec["request"] == "req.json"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "MARKER").exists()


def test_a_plain_name_request_is_never_read(tmp_path, monkeypatch):
    """A request named after its group carries nothing else: its bytes are not even opened."""
    def no_read(*args):
        raise AssertionError("a plain-name request was read")

    monkeypatch.setattr("throttler.spool.queue.read_request", no_read)
    spool = Spool(tmp_path / "spool").ensure()
    drop_request(spool.root, "g1", pickle.dumps(Payload(str(tmp_path / "pwned"))))
    (request,) = spool.scan()
    assert request.group == "g1" and request.strategy is None
    assert not (tmp_path / "pwned").exists()


FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "yaml", "subprocess", "dill", "cloudpickle",
                     "pty", "code", "codeop"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_ATTRIBUTES = {("os", "system"), ("os", "popen"), ("ast", "literal_eval"), ("pickle", "loads"),
                        ("importlib", "import_module")}


def test_the_package_has_no_deserialiser_evaluator_or_shell():
    """A static guard: no pickle/marshal/yaml/subprocess import, no eval/exec, no os.system/exec*/spawn*."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.name}:{node.lineno}: import {n}" for n in names
                          if n and n.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in FORBIDDEN_BUILTINS:
                    found.append(f"{path.name}:{node.lineno}: {node.func.id}(...)")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner, name = getattr(node.func.value, "id", ""), node.func.attr
                if (owner, name) in FORBIDDEN_ATTRIBUTES or (owner == "os" and name.startswith(("exec", "spawn"))):
                    found.append(f"{path.name}:{node.lineno}: {owner}.{name}(...)")
    assert found == []


# --------------------------------------------------------------------------- the real daemon


@pytest.fixture(scope="module")
def served(tmp_path_factory, dask_cluster):
    """``throttler serve`` against the session cluster, owners restricted, metrics on ':0' (empty host).

    Requests: a good group, one owned by a foreign user, a symlink, a pickle.
    Returns (daemon, tmp_path, metrics text, listening addresses, umask).
    """
    tmp = tmp_path_factory.mktemp("served")
    good = sims(tmp / "data", "good")
    (tmp / "out").mkdir()
    args = ["--spool", str(tmp / "spool"), "--data-root", str(tmp / "data"), "--output", str(tmp / "out"),
            "--scheduler", dask_cluster[0].scheduler_address, "--metrics-address", ":0",
            "--poll-seconds", "0.05", "--rescan-seconds", "0.5"]
    daemon = Daemon(args, tmp / "daemon.log", env={"THROTTLER_ALLOWED_UIDS": str(os.geteuid())})
    try:
        daemon.wait_ready()
        spool = tmp / "spool"
        drop_request(spool, "good")
        drop_request(spool, "foreign")
        os.chown(spool / "incoming" / "foreign", FOREIGN_UID, FOREIGN_UID)
        drop_request(spool, "evil.json", pickle.dumps(Payload(str(tmp / "pwned"))))
        target = tmp / "target.json"
        target.write_text('{"group": "good"}')
        os.symlink(target, spool / "incoming" / "link.json")
        wait_for(lambda: sum(len(r["requests"]) for k in ("done", "failed") for r in records(spool, k)) >= 4, 60)
        proc = psutil.Process(daemon.pid)
        listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        umask = re.search(r"^Umask:\s*(\d+)", Path(f"/proc/{daemon.pid}/status").read_text(), re.M).group(1)
        (port,) = {a.port for a in listening}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        yield daemon, tmp, good, metrics, listening, umask
    finally:
        daemon.kill()
        print(daemon.log())
        assert not leaked_processes()


def test_daemon_listens_on_loopback_only(served):
    listening = served[4]
    assert listening and {a.ip for a in listening} <= {"127.0.0.1", "::1"}, listening


def test_daemon_logs_the_metrics_address_it_bound(served):
    daemon, _, _, _, listening, _ = served
    (port,) = {a.port for a in listening}
    assert f"metrics on http://127.0.0.1:{port}/metrics" in daemon.log()


def test_daemon_runs_with_a_restrictive_umask_and_creates_no_world_readable_file(served):
    _, tmp, good, _, _, umask = served
    assert int(umask, 8) & 0o007 == 0o007, umask
    (done,) = records(tmp / "spool", "done")
    assert done["group"] == "good"
    assert_matches_reference(done["output"], good)
    for root in (tmp / "spool", tmp / "out"):
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                assert world_bits(os.path.join(folder, name)) == 0, os.path.join(folder, name)


def test_daemon_refuses_foreign_owners_symlinks_and_pickles(served):
    _, tmp, _, _, _, _ = served
    failed = {r["request"]: r for r in records(tmp / "spool", "failed")}
    assert set(failed) == {"foreign", "link.json", "evil.json"}
    assert f"owned by uid {FOREIGN_UID}, which is not allowed" in failed["foreign"]["reason"]
    assert failed["link.json"]["reason"] == "request is a symlink"
    assert failed["evil.json"]["reason"].startswith("invalid JSON")
    assert [r["reason_class"] for r in (failed["foreign"], failed["link.json"], failed["evil.json"])] == \
        ["ownership", "symlink", "invalid_json"]
    assert (tmp / "target.json").read_text() == '{"group": "good"}' and not (tmp / "pwned").exists()


def test_daemon_counts_refusals_in_its_metrics(served):
    metrics = served[3]
    for reason in ("ownership", "symlink", "invalid_json"):
        assert f'throttler_requests_rejected_total{{reason="{reason}"}} 1.0' in metrics, reason

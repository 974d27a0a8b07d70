"""Object store faults over real HTTP: a loopback proxy (tests/helpers/s3_proxy.py) in front of moto_server.

The daemon, ``throttler run`` and their Dask workers reach the store through the
proxy (``AWS_ENDPOINT_URL``), which answers 503 SlowDown bursts, 403 for chosen
objects, or holds an upload half received while the test kills its worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import wait_for
from tests.helpers.daemon import (
    Daemon,
    ExternalCluster,
    Proc,
    child_env,
    records,
    throttler_cli,
    wait_closed,
)
from tests.helpers.datafiles import write_sim
from tests.helpers.s3_proxy import S3Proxy
from tests.helpers.s3_server import upload_estate

BUCKET = "faults-bucket"
DATA = f"s3://{BUCKET}/data"
GROUPS = {"aligned": False, "shuffled": True, "denied": False}  #: group -> rows shuffled


@pytest.fixture(scope="module")
def estate(s3_server, tmp_path_factory):
    """Three groups of 3 files each, on local disk and under s3://faults-bucket/data/."""
    root = tmp_path_factory.mktemp("faults")
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    upload_estate(s3, BUCKET, root, GROUPS)
    return root, s3


@pytest.fixture()
def proxy(s3_server):
    proxy = S3Proxy(s3_server.endpoint)
    yield proxy
    proxy.stop()


def _daemon(tmp_path, proxy, output, *extra):
    spool = tmp_path / "spool"
    daemon = Daemon(["--spool", str(spool), "--data-root", DATA, "--output", output, "--metrics-address",
                     "127.0.0.1:0", "--poll-seconds", "0.05", "--rescan-seconds", "0.5", *extra],
                    tmp_path / "daemon.log", {"AWS_ENDPOINT_URL": proxy.endpoint})
    daemon.wait_ready()
    return spool, daemon


def _object_table(s3, key) -> pa.Table:
    return pq.read_table(pa.BufferReader(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))


def test_a_503_burst_is_survived_a_403_object_fails_its_group_alone_and_the_daemon_serves_on(estate, proxy,
                                                                                              tmp_path):
    root, s3 = estate
    proxy.deny(f"{BUCKET}/data/denied/f1.parquet")
    spool, daemon = _daemon(tmp_path, proxy, f"s3://{BUCKET}/out503")
    try:
        proxy.fail_next(10)
        assert throttler_cli("submit", "aligned", "shuffled", "--spool", str(spool)).returncode == 0
        wait_closed(spool, 2, 120, daemon)
        assert proxy.injected["503"] == 10
        assert throttler_cli("submit", "denied", "--spool", str(spool)).returncode == 0
        wait_closed(spool, 3, 60, daemon)
    finally:
        daemon.kill()
    done = {r["group"]: r for r in records(spool, "done")}
    assert sorted(done) == ["aligned", "shuffled"], daemon.log()
    for group in done:
        local = pq.read_table(root / group / "f0.parquet")
        assert _object_table(s3, f"out503/{group}.parquet").num_rows == local.num_rows
    [failed] = records(spool, "failed")
    assert failed["group"] == "denied"
    assert failed["error"] == "ObjectAccessError"
    assert failed["reason"].startswith(f"ObjectAccessError: {DATA}/denied/f1.parquet: access denied by the "
                                       "object store (When reading information for key 'data/denied/f1.parquet'"
                                       f" in bucket '{BUCKET}': AWS Error ACCESS_DENIED"), failed
    assert failed["attempts"] == 1 and len(failed["history"]) == 1, failed
    assert proxy.injected["403"] >= 1


def test_a_worker_that_cannot_reach_the_data_root_is_reported_by_the_worker_check(estate, proxy, s3_server,
                                                                                  tmp_path):
    """One worker of two reaches the store through an endpoint that refuses its credentials (403)."""
    refusing = S3Proxy(s3_server.endpoint)
    refusing.deny_all()
    cluster = ExternalCluster(tmp_path, n_workers=1)
    cluster.procs.append(Proc(["dask", "worker", cluster.address, "--nthreads", "1", "--memory-limit", "1GB",
                               "--no-dashboard", "--name", "blind"], tmp_path / "blind-worker.log",
                              child_env({"AWS_ENDPOINT_URL": refusing.endpoint})))
    try:
        client = cluster.connect(2)
        blind = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "blind")
        spool, daemon = _daemon(tmp_path, proxy, f"s3://{BUCKET}/blind-out", "--scheduler", cluster.address)
        try:
            daemon.wait_for_log(f"worker {blind} cannot read the data root {DATA} (OSError: ")
            log = daemon.log()
            assert log.count("cannot read the data root") == 1, log
            assert "AWS Error ACCESS_DENIED" in log, log

            def scrape() -> str:
                return urllib.request.urlopen(daemon.metrics_url(), timeout=10).read().decode()

            wait_for(lambda: "throttler_workers_without_data_access 1.0" in scrape(), 10)
            status = json.loads(throttler_cli("status", "--spool", str(spool), "--json").stdout)
            assert list(status["daemon"]["workers_without_data_access"]) == [blind]
            human = throttler_cli("status", "--spool", str(spool)).stdout
            assert f"NO DATA ACCESS worker {blind}: cannot read the data root {DATA} (OSError: " in human, human
        finally:
            daemon.kill()
    finally:
        cluster.close()
        refusing.stop()


def test_the_data_root_probe_reports_a_local_root_the_worker_cannot_see(tmp_path):
    from throttler.cluster.workers import data_root_probe, data_root_problem

    missing = tmp_path / "not-mounted"
    assert data_root_probe(str(tmp_path))() == {"error": None}
    report = data_root_probe(str(missing))()
    assert report == {"error": f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"}
    assert data_root_problem(str(missing), report).startswith(f"cannot read the data root {missing} (")


def _uploading_worker(run: subprocess.Popen, proxy_port: int) -> psutil.Process:
    """The process under ``run`` holding a connection to the proxy (the worker writing the output)."""
    for proc in psutil.Process(run.pid).children(recursive=True):
        if any(c.raddr and c.raddr.port == proxy_port for c in proc.net_connections("tcp")):
            return proc
    raise AssertionError("no process of the run is connected to the proxy")


def test_a_worker_killed_mid_upload_leaves_no_partial_object_and_the_group_completes(estate, proxy, tmp_path):
    """The output (2M rows, about 20 MB) is larger than the loopback socket buffers, so the worker is
    still sending when the proxy stops reading half way and the test kills it."""
    root, s3 = estate
    (root / "big").mkdir()
    for i in range(2):
        path = write_sim(root / "big" / f"f{i}.parquet", 2000, 1000, seed=i)
        s3.upload_file(path, BUCKET, f"data/big/f{i}.parquet")
    proxy.hold_next_upload()
    run = subprocess.Popen([sys.executable, "-m", "throttler", "run", "big", "--data-root", DATA, "--output",
                            f"s3://{BUCKET}/killed", "--workers", "1", "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=child_env({"AWS_ENDPOINT_URL": proxy.endpoint}))
    try:
        assert proxy.put_held.wait(120), "no upload reached the proxy"
        assert s3.list_objects_v2(Bucket=BUCKET, Prefix="killed/")["KeyCount"] == 0
        worker = _uploading_worker(run, int(proxy.endpoint.rsplit(":", 1)[1]))
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(30)
        proxy.release_upload()
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out + err
    assert out.startswith("ok     big: 2,000,000 rows from 2 files"), out
    wait_for(lambda: proxy.puts_dropped == 1, 10)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="killed/")
    assert [o["Key"] for o in listed["Contents"]] == ["killed/big.parquet"]
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET)
    want = throttler_cli("run", "big", "--data-root", str(root), "--output", str(tmp_path / "local"),
                         "--workers", "1", "--quiet", timeout_seconds=120)
    assert want.returncode == 0, want.stdout + want.stderr
    assert _object_table(s3, "killed/big.parquet").equals(pq.read_table(tmp_path / "local" / "big.parquet"))


def test_the_clients_retry_503s_themselves_but_not_on_a_short_ranged_get(estate, proxy, monkeypatch):
    """What the S3 clients' own retries cover, over real HTTP, and how what is left is classified.

    A 503 to a ranged GET shorter than the error's XML body is not retried by
    pyarrow's client (aws-sdk-cpp writes the error body into the caller's buffer,
    overflows it and loses the status): it surfaces as INTERNAL_FAILURE, which
    :func:`storage.store_failure` reads as an outage.
    """
    from throttler import storage
    from throttler.storage import TRANSIENT, ObjectAccessError

    attempts = 3  # fewer than the default, to keep botocore's backoff (up to 20 s a retry) short here
    monkeypatch.setattr(storage, "S3_REQUEST_MAX_ATTEMPTS", attempts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setattr(storage, "_filesystems", {})
    monkeypatch.setattr(storage, "_s3_clients", {})
    fs, key = storage.split(f"{DATA}/aligned/f0.parquet")
    proxy.fail_next(attempts - 1)
    size = fs.get_file_info(key).size
    assert proxy.injected["503"] == attempts - 1 and proxy.requests["HEAD"] == attempts
    source = fs.open_input_file(key)
    proxy.fail_next(1)
    assert len(source.read_at(size, 0)) == size  # the error body fits the buffer: retried by the client
    proxy.fail_next(1)
    with pytest.raises(OSError, match="AWS Error INTERNAL_FAILURE during GetObject operation") as short:
        source.read_at(8, 0)
    assert storage.store_failure(short.value) == TRANSIENT

    url = f"s3://{BUCKET}/retried/o.bin"
    proxy.fail_next(attempts - 1)
    assert storage.write_object(url, b"x" * 1000) == 1000
    assert proxy.requests["PUT"] == attempts
    proxy.fail_next(attempts)
    with pytest.raises(OSError, match=f"^{url}: object store unavailable after {attempts} attempts"):
        storage.write_object(url, b"y")
    proxy.reset()
    proxy.deny(f"{BUCKET}/retried/denied.bin")
    with pytest.raises(ObjectAccessError, match=f"^s3://{BUCKET}/retried/denied.bin: access denied by the object"):
        storage.write_object(f"s3://{BUCKET}/retried/denied.bin", b"z")
    with pytest.raises(ObjectAccessError, match="^s3://no-such-bucket/o.bin: no such object or bucket"):
        storage.write_object("s3://no-such-bucket/o.bin", b"z")
    assert proxy.requests["PUT"] == 2  # neither refusal was retried
    s3 = estate[1]
    assert s3.get_object(Bucket=BUCKET, Key="retried/o.bin")["Body"].read() == b"x" * 1000


def test_the_output_probe_needs_the_daemons_own_directory_and_a_file_it_can_create(tmp_path):
    from throttler.cluster.workers import output_marker, output_probe, output_problem

    out = tmp_path / "out"
    out.mkdir()
    with output_marker(str(out)) as marker:
        assert marker.startswith(".throttler-probe.") and (out / marker).is_file()
        assert output_probe(str(out), marker)() == {"error": None}
        other = tmp_path / "same-path-elsewhere"  # what a worker with another file system there sees
        other.mkdir()
        report = output_probe(str(other), marker)()
    assert report == {"error": "it is not the daemon's directory: the file the daemon has just created there is "
                               "not seen (another file system at this path)"}
    assert output_problem(str(other), report).startswith(f"cannot write the output directory {other} (it is not ")
    assert list(out.iterdir()) == [] and list(other.iterdir()) == []  # neither the marker nor a test file is left
    missing = tmp_path / "not-mounted"
    assert output_probe(str(missing), None)() == {"error": "FileNotFoundError: [Errno 2] No such file or directory"}
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"")
    assert output_probe(str(a_file), None)() == {"error": "NotADirectoryError: [Errno 20] Not a directory"}
    with output_marker(str(missing)) as marker:  # the daemon cannot create it: the workers' own test still runs
        assert marker is None
    left = out / ".throttler-probe.0123456789ab.tmp"  # a worker killed during its write test
    left.write_bytes(b"")
    (out / "g.parquet").write_bytes(b"kept")
    with output_marker(str(out)):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["g.parquet"]

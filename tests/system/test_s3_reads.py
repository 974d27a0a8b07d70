"""The aligned leaf's reads on an object store overlap, over real HTTP (moto_server behind the fault proxy).

The proxy waits a fixed time before forwarding each request (a cloud store's
first-byte latency, which loopback lacks), so reads that are issued together are
seen in flight together: the proxy's count of GETs in flight at once is a
structural fact of the client's request pattern, not a timing.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from tests.helpers.datafiles import write_sim
from tests.helpers.s3_proxy import S3Proxy, most_in_flight
from throttler.errors import MisalignedKeys
from throttler.worker import kernels

BUCKET = "reads-bucket"
ROW_GROUPS = 8
LATENCY_SECONDS = 0.05


@pytest.fixture(scope="module")
def module_proxy(s3_server):
    """One proxy for the module: this process's file system of the bucket is made (and cached) pointing at it."""
    proxy = S3Proxy(s3_server.endpoint)
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    yield proxy
    os.environ["AWS_ENDPOINT_URL"] = saved
    proxy.stop()


@pytest.fixture(scope="module")
def files(s3_server, module_proxy, tmp_path_factory):
    """Three aligned files of 8 row groups and one with shuffled rows, on local disk and in the store.

    16,000 rows: each row group's value chunk (18.9 KB) is wider than the gap below which
    ranges are coalesced, as in real files (8 MB), so a row group's key ranges are one GET.
    """
    root = tmp_path_factory.mktemp("reads")
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    local = []
    for i, shuffle in enumerate((False, False, False, True)):
        path = write_sim(root / f"f{i}.parquet", 400, 40, seed=i, shuffle=shuffle, row_group_size=2000)
        s3.upload_file(path, BUCKET, f"g/f{i}.parquet")
        local.append(path)
    return local, [f"s3://{BUCKET}/g/f{i}.parquet" for i in range(4)]


@pytest.fixture()
def proxy(module_proxy):
    module_proxy.reset()
    module_proxy.set_latency(LATENCY_SECONDS)
    yield module_proxy
    module_proxy.set_latency(0.0)


@pytest.mark.parametrize("in_flight", [4, 1])
def test_an_s3_aligned_leaf_keeps_its_reads_in_flight_together_and_equals_the_local_leaf(files, proxy, monkeypatch,
                                                                                          in_flight):
    local, urls = files
    monkeypatch.setenv("THROTTLER_OBJECT_STORE_READS_IN_FLIGHT", str(in_flight))
    expected = kernels.aligned_leaf(local[:3], local[0])
    proxy.reset()
    got = kernels.aligned_leaf(urls[:3], urls[0])
    assert np.array_equal(got.data, expected.data)
    assert (got.files, got.bytes_read) == (expected.files, expected.bytes_read)
    # the value chunks' GETs (18,857 bytes a chunk here: nothing else is that size) ran in_flight at a
    # time (the next file's footer and key GETs, read ahead meanwhile, come on top of them)
    assert most_in_flight(proxy.gets, 18_000, 19_000) == in_flight
    # one HEAD a file opened (the reference, then each file); GETs: a footer each, the reference's
    # 8 key ranges (path + Date of a row group in one), 8 value chunks a file, 8 key ranges a
    # file but the reference: the keys were proved equal by their bytes, never decoded
    assert (proxy.requests["HEAD"], proxy.requests["GET"]) == (4, (1 + 8) + 3 * (1 + 8) + 2 * 8)


def test_a_misaligned_s3_file_fails_the_leaf_and_its_reads_stop(files, proxy):
    _, urls = files
    with pytest.raises(MisalignedKeys, match="f3.parquet: keys differ"):
        kernels.aligned_leaf([urls[0], urls[3]], urls[0])
    assert [t.name for t in threading.enumerate() if t.name.startswith("throttler-store-read")] == []


def test_the_daemons_setting_reaches_every_worker_unless_the_worker_has_its_own(client):
    from throttler.cluster import worker_settings
    from throttler.config import load
    from throttler.worker import store_reads

    name = worker_settings.environ_name("object_store_reads_in_flight")
    workers = sorted(client.scheduler_info()["workers"])
    client.run(_set_environ, name, "5", workers=workers[:1])  # this worker's own setting
    try:
        for daemon_value in (3, 4):  # a later daemon's value replaces an earlier one's
            worker_settings.register(client, load(overrides={"object_store_reads_in_flight": daemon_value},
                                                  environ={}))
            assert client.run(store_reads.reads_in_flight) == {workers[0]: 5,
                                                               **{w: daemon_value for w in workers[1:]}}
    finally:
        client.unregister_worker_plugin(worker_settings.WorkerSettingsPlugin.name)
        client.run(_set_environ, name, None)
        client.run(_forget_daemon_settings)


def _set_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _forget_daemon_settings() -> None:
    from throttler.cluster import worker_settings

    worker_settings._from_daemon.clear()

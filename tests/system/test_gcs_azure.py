"""Data and outputs on gs:// and abfs://, against real GCS and Azure Blob API servers on loopback.

fake-gcs-server and Azurite (tests/helpers/cloud_servers.py), pointed at by the
clouds' standard variables (``STORAGE_EMULATOR_HOST``,
``AZURE_STORAGE_CONNECTION_STRING``) that ``throttler run``, its embedded
cluster's worker processes and the SDKs all read. Each test runs once per store.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.daemon import throttler_cli
from tests.helpers.datafiles import write_sim
from throttler import storage
from throttler.cloud_stores import AZURE_CONNECTION_ENV, AZURITE_ACCOUNT, AZURITE_KEY

BUCKET = "estate-bucket"
GROUPS = {"aligned": False, "shuffled": True}  #: group -> rows shuffled


class Gcs:
    name = "gcs"

    def __init__(self):
        from google.cloud import storage as gcs

        self.client = gcs.Client()

    def url(self, bucket: str, key: str = "") -> str:
        return f"gs://{bucket}/{key}".rstrip("/")

    def create(self, bucket: str) -> None:
        self.client.create_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.bucket(bucket).blob(key).upload_from_string(data)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.bucket(bucket).blob(key).download_as_bytes()

    def names(self, bucket: str, prefix: str) -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(bucket, prefix=prefix))


class Azure:
    name = "azure"

    def __init__(self):
        from azure.storage.blob import BlobServiceClient

        self.client = BlobServiceClient.from_connection_string(os.environ[AZURE_CONNECTION_ENV])

    def url(self, container: str, key: str = "") -> str:
        return f"abfs://{container}@{AZURITE_ACCOUNT}.dfs.core.windows.net/{key}".rstrip("/")

    def create(self, container: str) -> None:
        self.client.create_container(container)

    def put(self, container: str, key: str, data: bytes) -> None:
        self.client.get_blob_client(container, key).upload_blob(data, overwrite=True)

    def get(self, container: str, key: str) -> bytes:
        return self.client.get_blob_client(container, key).download_blob().readall()

    def names(self, container: str, prefix: str) -> list[str]:
        return sorted(b.name for b in self.client.get_container_client(container).list_blobs(name_starts_with=prefix))


@pytest.fixture(scope="module")
def local_estate(tmp_path_factory):
    """The small estate on local disk, and the outputs of ``throttler run`` on it."""
    root = tmp_path_factory.mktemp("cloudestate")
    for group, shuffle in GROUPS.items():
        (root / group).mkdir()
        for i in range(3):
            write_sim(root / group / f"f{i}.parquet", 40, 5, seed=i, shuffle=shuffle)
    out = root.parent / (root.name + "-out")
    done = _run(root, out, *GROUPS)
    assert done.returncode == 0, done.stdout + done.stderr
    return root, out


@pytest.fixture(scope="module", params=["gcs", "azure"])
def store(request, local_estate):
    """The same estate under <store>://estate-bucket/data/, plus a corrupt object."""
    request.getfixturevalue(f"{request.param}_server")
    store = Gcs() if request.param == "gcs" else Azure()
    store.create(BUCKET)
    root, _out = local_estate
    for group in GROUPS:
        for path in sorted((root / group).iterdir()):
            store.put(BUCKET, f"data/{group}/{path.name}", path.read_bytes())
    store.put(BUCKET, "data/corrupt/f0.parquet", b"PAR1 this is not parquet PAR1")
    return store


def _run(data_root, out, *groups, extra=()):
    return throttler_cli("run", *groups, "--data-root", str(data_root), "--output", str(out), "--workers", "1",
                         "--quiet", *extra, timeout_seconds=180)


def test_run_on_the_store_equals_the_local_run_and_leaves_only_the_outputs(store, local_estate):
    _root, local_out = local_estate
    done = _run(store.url(BUCKET, "data"), store.url(BUCKET, "results"), *GROUPS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-> {store.url(BUCKET, 'results/aligned.parquet')}" in done.stdout
    assert "ok     aligned: 200 rows from 3 files" in done.stdout and "(aligned, " in done.stdout
    assert "ok     shuffled: 200 rows from 3 files" in done.stdout and "(dense (keys not aligned), " in done.stdout
    for group in GROUPS:
        want = pq.read_table(local_out / f"{group}.parquet")
        assert pq.read_table(pa.BufferReader(store.get(BUCKET, f"results/{group}.parquet"))).equals(want)
    assert store.names(BUCKET, "results/") == ["results/aligned.parquet", "results/shuffled.parquet"]


def test_a_run_with_a_new_object_extends_the_previous_output_from_a_server_side_copy(store, local_estate, tmp_path):
    """An incremental run: the previous output pinned by a copy (``storage.copy_object``), only the new file
    read, the result equal to the sum over all four files, the private copy swept (``list_prefixed``, delete)."""
    import re

    from tests.helpers.datafiles import assert_matches_reference

    root, local_out = local_estate
    for group, shuffle in GROUPS.items():  # the estate's three files and their output, then a fourth file
        for i in range(3):
            storage.copy_object(store.url(BUCKET, f"data/{group}/f{i}.parquet"),
                                store.url(BUCKET, f"more/{group}/f{i}.parquet"))
        store.put(BUCKET, f"more-out/{group}.parquet", (local_out / f"{group}.parquet").read_bytes())
        write_sim(tmp_path / f"{group}-f3.parquet", 44, 5, seed=4, shuffle=shuffle)  # keys no file had
        store.put(BUCKET, f"more/{group}/f3.parquet", (tmp_path / f"{group}-f3.parquet").read_bytes())
    done = _run(store.url(BUCKET, "more"), store.url(BUCKET, "more-out"), *GROUPS)
    assert done.returncode == 0, done.stdout + done.stderr
    for group in GROUPS:
        assert re.search(rf"^ok     {group}: .*incremental: 1 file read", done.stdout, re.MULTILINE), done.stdout
        (tmp_path / f"{group}.out.parquet").write_bytes(store.get(BUCKET, f"more-out/{group}.parquet"))
        inputs = [str(root / group / f"f{i}.parquet") for i in range(3)] + [str(tmp_path / f"{group}-f3.parquet")]
        assert_matches_reference(tmp_path / f"{group}.out.parquet", inputs, rtol=1e-12)
    assert store.names(BUCKET, "more-out/") == ["more-out/aligned.parquet", "more-out/shuffled.parquet"]


def test_missing_group_object_and_corrupt_object_are_per_group_failures(store, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("group_id,file\nok,aligned/f0.parquet\ngone,aligned/f9.parquet\nbad,corrupt/f0.parquet\n")
    done = _run(store.url(BUCKET, "data"), store.url(BUCKET, "bad-results"), "ok", "gone", "bad",
                extra=("--manifest", str(manifest)))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = sorted(done.stdout.splitlines())
    assert lines[0].startswith(f"FAILED bad: DataError: {store.url(BUCKET, 'data/corrupt/f0.parquet')}: "), lines
    assert lines[1] == f"FAILED gone: DataError: {store.url(BUCKET, 'data/aligned/f9.parquet')}: file not found", lines
    assert lines[2].startswith("ok     ok: 200 rows from 1 file in "), lines
    assert store.names(BUCKET, "bad-results/") == ["bad-results/ok.parquet"]
    assert "AccountKey" not in done.stdout + done.stderr and AZURITE_KEY not in done.stdout + done.stderr


def test_a_missing_bucket_or_container_is_refused_before_start(store):
    for flag in ("--data-root", "--output"):
        args = {"--data-root": store.url(BUCKET, "data"), "--output": store.url(BUCKET, "results"),
                flag: store.url("no-such-bucket", "x")}
        done = _run(args["--data-root"], args["--output"], "aligned")
        assert done.returncode == 2, done.stdout + done.stderr
        what = "data root" if flag == "--data-root" else "output"
        assert f"{what} {store.url('no-such-bucket', 'x')} cannot be listed: [Errno 2] bucket 'no-such-bucket' does not " \
               "exist" in done.stderr, done.stderr
    assert "AccountKey" not in done.stderr


def test_catalog_lists_groups_and_files_under_the_root(store):
    from throttler.errors import CatalogError
    from throttler.planning.catalog import Catalog

    catalog = Catalog(store.url(BUCKET, "data"))
    assert catalog.groups() == ["aligned", "corrupt", "shuffled"]
    assert catalog.files("aligned") == [store.url(BUCKET, f"data/aligned/f{i}.parquet") for i in range(3)]
    with pytest.raises(CatalogError) as unknown:  # a per-group error (GCS's listing words it differently)
        catalog.files("nosuch")
    assert str(unknown.value) == {
        "gcs": f"group 'nosuch': cannot list {store.url(BUCKET, 'data/nosuch')}/ (No such file or directory "
               f"'{BUCKET}/data/nosuch')",
        "azure": f"unknown group 'nosuch': nothing under {store.url(BUCKET, 'data/nosuch')}/"}[store.name]


def test_copy_list_and_delete_pin_and_sweep_a_previous_output(store):
    """What incremental runs and the temporaries' sweep use: a server-side copy, a prefix listing, a delete."""
    from throttler.worker import output

    store.put(BUCKET, "pin/g.parquet", b"version 1")
    source, copy = store.url(BUCKET, "pin/g.parquet"), store.url(BUCKET, "pin/.g.parquet.0123456789ab.tmp")
    storage.copy_object(source, copy)
    store.put(BUCKET, "pin/g.parquet", b"version 2")
    assert store.get(BUCKET, "pin/.g.parquet.0123456789ab.tmp") == b"version 1"
    assert storage.list_prefixed(store.url(BUCKET, "pin/.g.parquet.")) == [copy]
    assert output.sweep_temporaries(store.url(BUCKET, "pin"), "g") == [".g.parquet.0123456789ab.tmp"]
    assert store.names(BUCKET, "pin/") == ["pin/g.parquet"]
    storage.delete_object(copy)  # already gone: no error
    with pytest.raises(FileNotFoundError):
        storage.copy_object(store.url(BUCKET, "pin/none.parquet"), copy)


def test_the_worker_probe_reports_a_data_root_it_cannot_read(store):
    from throttler.cluster.workers import data_root_probe

    assert data_root_probe(store.url(BUCKET, "data"))() == {"error": None}
    report = data_root_probe(store.url("no-such-bucket", "data"))()
    assert report == {"error": "FileNotFoundError: [Errno 2] bucket 'no-such-bucket' does not exist"}


def _chunked(monkeypatch):
    """Uploads in 256 KiB pieces, so a 9 MiB output is 36 requests and can fail between them."""
    from throttler import cloud_stores

    monkeypatch.setattr(cloud_stores, "GCS_CHUNK_BYTES", 256 * 1024)
    monkeypatch.setattr(cloud_stores, "AZURE_SINGLE_PUT_BYTES", 256 * 1024)
    monkeypatch.setattr(cloud_stores, "AZURE_BLOCK_BYTES", 256 * 1024)


_PAYLOAD = bytes(range(256)) * (36 * 1024)  #: 9 MiB: past the 8 MiB GCS sends in one request


def test_an_upload_failing_mid_way_leaves_the_previous_object_whole_or_none(store, monkeypatch):
    import requests

    from tests.helpers.cloud_servers import upload_request_hook

    _chunked(monkeypatch)
    monkeypatch.setattr(requests.Session, "request", requests.Session.request)  # undone after the test

    def fail():
        raise RuntimeError("connection lost mid-upload")

    upload_request_hook(store.name, fail, after=4)  # 3 chunks sent and accepted by the server first
    store.put(BUCKET, "atomic/old.parquet", b"the previous output")
    for key in ("atomic/new.parquet", "atomic/old.parquet"):
        with pytest.raises(RuntimeError, match="mid-upload"):
            storage.write_object(store.url(BUCKET, key), _PAYLOAD)
        upload_request_hook(store.name, fail, after=4)
    assert store.names(BUCKET, "atomic/") == ["atomic/old.parquet"]
    assert store.get(BUCKET, "atomic/old.parquet") == b"the previous output"
    monkeypatch.undo()
    assert storage.write_object(store.url(BUCKET, "atomic/new.parquet"), _PAYLOAD) == len(_PAYLOAD)
    assert store.get(BUCKET, "atomic/new.parquet") == _PAYLOAD


_KILLED_WRITER = """
import sys, time
from tests.helpers.cloud_servers import upload_request_hook
from throttler import cloud_stores, storage
for name in ("GCS_CHUNK_BYTES", "AZURE_SINGLE_PUT_BYTES", "AZURE_BLOCK_BYTES"):
    setattr(cloud_stores, name, 256 * 1024)
def hold():
    print("mid-upload", flush=True)
    time.sleep(120)
upload_request_hook(sys.argv[1], hold, after=4)
storage.write_object(sys.argv[2], bytes(range(256)) * (36 * 1024))
"""


def test_a_writer_killed_mid_upload_leaves_no_object(store):
    import subprocess
    import sys

    url = store.url(BUCKET, "killed/g.parquet")
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, store.name, url], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == "mid-upload\n"  # three chunks are on the server
    finally:
        writer.kill()
        writer.wait(10)
    assert store.names(BUCKET, "killed/") == []
    with pytest.raises(FileNotFoundError):
        storage.size_bytes(url)
    if store.name == "azure":  # the blocks did reach the server: staged, in no committed block list
        listed = store.client.get_container_client(BUCKET).list_blobs(name_starts_with="killed/",
                                                                       include=["uncommittedblobs"])
        assert [b.name for b in listed] == ["killed/g.parquet"]


def test_a_wrong_azure_key_is_refused_as_access_denied_everywhere(azure_server, monkeypatch):
    """Azurite checks shared-key signatures: a connection string with the wrong key gets real 403s, which
    every read, the output write and the worker probe report as a refusal (not an outage), key unshown."""
    from throttler.cluster.workers import data_root_probe

    azure = Azure()
    azure.create("denied")
    azure.put("denied", "data/g/f0.parquet", b"PAR1 x PAR1")
    wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
    monkeypatch.setenv(AZURE_CONNECTION_ENV, azure_server.connection_string().replace(AZURITE_KEY, wrong))
    monkeypatch.setattr(storage, "_filesystems", {})
    url = azure.url("denied", "data/g/f0.parquet")
    for read in (lambda: storage.size_bytes(url), lambda: storage.open_input(url),
                 lambda: storage.list_files(azure.url("denied", "data/g"), ".parquet")):
        with pytest.raises(OSError) as refused:
            read()
        assert storage.store_failure(refused.value) == storage.DENIED
        assert "Azure Error: [AuthorizationFailure] 403" in str(refused.value)
    with pytest.raises(storage.ObjectAccessError, match=r"^abfs://denied@devstoreaccount1\.dfs\.core\.windows\.net/"
                       r"data/g/out\.parquet: access denied by the object store \(Server failed to authenticate"):
        storage.write_object(azure.url("denied", "data/g/out.parquet"), b"output")
    report = data_root_probe(azure.url("denied", "data"))()
    assert report["error"].startswith("OSError: GetProperties for 'http://127.0.0.1:") and "403" in report["error"]
    done = _run(azure.url("denied", "data"), azure.url("denied", "out"), "g")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"data root {azure.url('denied', 'data')} cannot be listed: " in done.stderr and "403" in done.stderr
    assert wrong not in done.stderr + done.stdout + str(report) and AZURITE_KEY not in done.stderr
    assert azure.names("denied", "") == ["data/g/f0.parquet"]

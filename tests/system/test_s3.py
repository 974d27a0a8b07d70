"""Data and outputs on object storage, against a real S3 API server on loopback (moto_server).

``throttler run`` reads s3:// groups (listed prefixes) and writes s3:// outputs
through its embedded cluster, whose worker processes inherit the endpoint and
credentials from the environment; outputs must equal the same run on local files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.daemon import throttler_cli
from tests.helpers.s3_server import upload_estate
from throttler import storage
from throttler.worker import output

BUCKET = "estate-bucket"
GROUPS = {"aligned": False, "shuffled": True}  #: group -> rows shuffled


@pytest.fixture(scope="module")
def estate(s3_server, tmp_path_factory):
    """The same small estate on local disk and under s3://estate-bucket/data/."""
    root = tmp_path_factory.mktemp("s3estate")
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    upload_estate(s3, BUCKET, root, GROUPS)
    s3.put_object(Bucket=BUCKET, Key="data/corrupt/f0.parquet", Body=b"PAR1 this is not parquet PAR1")
    return root, s3


def _run(data_root, out, *groups):
    return throttler_cli("run", *groups, "--data-root", str(data_root), "--output", str(out), "--workers", "1",
                         "--quiet", timeout_seconds=180)


def _object_table(s3, key) -> pa.Table:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return pq.read_table(pa.BufferReader(body))


def test_run_from_s3_to_s3_equals_the_local_run_and_leaves_nothing_else(estate, tmp_path):
    root, s3 = estate
    local = _run(root, tmp_path / "out", *GROUPS)
    assert local.returncode == 0, local.stdout + local.stderr
    remote = _run(f"s3://{BUCKET}/data", f"s3://{BUCKET}/results", *GROUPS)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert f"-> s3://{BUCKET}/results/aligned.parquet" in remote.stdout
    assert "ok     aligned: 200 rows from 3 files" in remote.stdout and "(aligned, " in remote.stdout
    assert "ok     shuffled: 200 rows from 3 files" in remote.stdout and "(dense (keys not aligned), " in remote.stdout
    for group in GROUPS:
        want = pq.read_table(tmp_path / "out" / f"{group}.parquet")
        assert _object_table(s3, f"results/{group}.parquet").equals(want)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="results/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["results/aligned.parquet", "results/shuffled.parquet"]
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET)


def test_missing_group_and_corrupt_object_are_per_group_errors_naming_them(estate):
    _root, _s3 = estate
    done = _run(f"s3://{BUCKET}/data", f"s3://{BUCKET}/bad-results", "nosuch", "corrupt", "aligned")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = sorted(done.stdout.splitlines())
    assert lines[0].startswith(f"FAILED corrupt: DataError: s3://{BUCKET}/data/corrupt/f0.parquet: "), lines
    assert lines[1] == f"FAILED nosuch: CatalogError: unknown group 'nosuch': nothing under s3://{BUCKET}/data/nosuch/", lines
    assert lines[2].startswith("ok     aligned: 200 rows from 3 files"), lines


@pytest.mark.parametrize("flag, url, message", [
    ("--data-root", "s3://no-such-bucket/data", "data root s3://no-such-bucket/data cannot be listed: "),
    ("--output", "s3://no-such-bucket/out", "output s3://no-such-bucket/out cannot be listed: "),
    ("--data-root", "s3://key:secret@estate-bucket/data", "credentials or options in a URL are refused"),
])
def test_a_missing_bucket_or_a_url_with_credentials_is_refused_before_start(estate, flag, url, message):
    args = {"--data-root": f"s3://{BUCKET}/data", "--output": f"s3://{BUCKET}/results", flag: url}
    done = _run(args["--data-root"], args["--output"], "aligned")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "secret" not in done.stderr


def test_a_failed_output_write_leaves_no_object_and_no_multipart_upload(estate):
    _root, s3 = estate
    url = f"s3://{BUCKET}/partial/g.parquet"
    schema = output.output_schema(pa.date32())

    def tables():
        for _ in range(4):  # about 24 MB encoded: past any multipart part size
            yield pa.table({"path": pa.array(range(1_000_000), pa.int64()),
                            "Date": pa.array([0] * 1_000_000, pa.date32()),
                            "value": pa.array(np.random.default_rng(0).standard_normal(1_000_000))},
                           schema=schema)
        raise RuntimeError("worker failed mid-output")

    with pytest.raises(RuntimeError, match="mid-output"):
        output.write_tables(url, schema, tables())
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="partial/")["KeyCount"] == 0
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET)
    assert storage.list_files(f"s3://{BUCKET}/data/aligned", ".parquet") == [
        f"s3://{BUCKET}/data/aligned/f{i}.parquet" for i in range(3)]


def test_a_manifest_on_an_s3_root_resolves_keys_and_refuses_entries_outside_it(estate, tmp_path):
    from throttler.errors import CatalogError
    from throttler.planning.catalog import Catalog

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("group_id,file\nok,aligned/f0.parquet\nok,./shuffled/../aligned/f1.parquet\n"
                        "escape,../elsewhere/f0.parquet\nother,s3://other-bucket/data/f0.parquet\n")
    catalog = Catalog(f"s3://{BUCKET}/data/", manifest)
    assert catalog.files("ok") == [f"s3://{BUCKET}/data/aligned/f0.parquet", f"s3://{BUCKET}/data/aligned/f1.parquet"]
    with pytest.raises(CatalogError, match=f"resolves to s3://{BUCKET}/elsewhere/f0.parquet, outside the data root"):
        catalog.files("escape")
    with pytest.raises(CatalogError, match="outside the data root"):
        catalog.files("other")
    assert Catalog(f"s3://{BUCKET}/data").groups() == ["aligned", "corrupt", "shuffled"]


def test_plan_reads_s3_footers_and_reports_the_time(estate):
    done = throttler_cli("plan", "aligned", "--data-root", f"s3://{BUCKET}/data", "--workers", "1",
                         timeout_seconds=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("group aligned: 3 files, ") and "; footers read in " in first, done.stdout


def test_the_daemon_serves_s3_groups_to_s3_outputs_with_records_in_the_local_spool(estate, tmp_path):
    from tests.helpers.daemon import Daemon, records, wait_closed
    from tests.helpers.datafiles import assert_matches_reference

    root, s3 = estate
    spool = tmp_path / "spool"
    daemon = Daemon(["--spool", str(spool), "--data-root", f"s3://{BUCKET}/data", "--output",
                     f"s3://{BUCKET}/daemon-out", "--metrics-address", "127.0.0.1:0", "--poll-seconds", "0.05",
                     "--rescan-seconds", "0.5"], tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        assert f"data root s3://{BUCKET}/data; output s3://{BUCKET}/daemon-out; " in daemon.log()
        assert throttler_cli("submit", "shuffled", "aligned", "--spool", str(spool)).returncode == 0
        wait_closed(spool, 2, 120, daemon)
    finally:
        daemon.kill()
    done = {r["group"]: r for r in records(spool, "done")}
    assert sorted(done) == ["aligned", "shuffled"], daemon.log()
    for group in done:
        assert done[group]["output"] == f"s3://{BUCKET}/daemon-out/{group}.parquet"
        local = tmp_path / f"{group}.parquet"
        s3.download_file(BUCKET, f"daemon-out/{group}.parquet", str(local))
        assert_matches_reference(local, sorted(str(p) for p in (root / group).iterdir()))

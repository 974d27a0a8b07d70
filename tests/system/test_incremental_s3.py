"""Incremental runs on object storage (issue 17), against a real S3 API server on loopback (moto_server).

``throttler run`` from s3:// to s3:// as files are added, left alone, rewritten
and removed: each run's kind and files read, its output equal to the sum over
the group's files as they are (1e-12 relative), the output object untouched
when nothing changed, and no private copy of a previous output left behind.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers.daemon import throttler_cli
from tests.helpers.datafiles import assert_matches_reference, write_sim
from throttler.worker.state import fingerprint

BUCKET = "incremental-bucket"
GROUPS = {"aligned": {"shuffle": False}, "shuffled": {"shuffle": True}}
RTOL = 1e-12


@pytest.fixture()
def estate(s3_server, tmp_path):
    """Local copies (the reference) of the files under s3://incremental-bucket/data/<group>/."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    yield tmp_path, s3
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


def _put(estate, group: str, name: str, seed: int) -> None:
    root, s3 = estate
    (root / group).mkdir(exist_ok=True)
    path = write_sim(root / group / name, 40 + 4 * (seed % 3), 5, seed=seed, **GROUPS[group])  # keys may grow
    s3.upload_file(path, BUCKET, f"data/{group}/{name}")


def _remove(estate, group: str, name: str) -> None:
    root, s3 = estate
    (root / group / name).unlink()
    s3.delete_object(Bucket=BUCKET, Key=f"data/{group}/{name}")


def _run(*extra: str) -> str:
    done = throttler_cli("run", *GROUPS, "--data-root", f"s3://{BUCKET}/data", "--output", f"s3://{BUCKET}/out",
                         "--workers", "1", "--quiet", *extra, timeout_seconds=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _check(estate, stdout: str, note: str) -> None:
    """Each group's line says ``note`` (``{group}``: its name); its output is the sum over its files; only outputs are left."""
    root, s3 = estate
    for group in GROUPS:
        assert re.search(rf"^ok     {group}: .*{re.escape(note.format(group=group))}", stdout, re.MULTILINE), stdout
        s3.download_file(BUCKET, f"out/{group}.parquet", str(root / f"{group}.out.parquet"))
        assert_matches_reference(root / f"{group}.out.parquet", sorted(str(p) for p in (root / group).iterdir()),
                                 rtol=RTOL)
    keys = [i["Key"] for i in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/").get("Contents", [])]
    assert sorted(keys) == [f"out/{group}.parquet" for group in sorted(GROUPS)]  # private copies swept


def test_s3_runs_read_only_new_objects_and_equal_the_full_sum_as_files_come_and_go(estate):
    _, s3 = estate
    for group in GROUPS:
        for i in range(3):
            _put(estate, group, f"f{i}.parquet", seed=i)
    _check(estate, _run(), "full (no previous output): 3 files read")
    for group in GROUPS:
        _put(estate, group, "f3.parquet", seed=4)  # a new file, with keys no earlier one has
    _check(estate, _run(), "incremental: 1 file read")
    before = {g: s3.head_object(Bucket=BUCKET, Key=f"out/{g}.parquet") for g in GROUPS}
    _check(estate, _run(), "unchanged: no file new or changed, 0 files read, output untouched")
    for group in GROUPS:  # untouched: the same version of the same bytes
        after = s3.head_object(Bucket=BUCKET, Key=f"out/{group}.parquet")
        assert (after["ETag"], after["LastModified"]) == (before[group]["ETag"], before[group]["LastModified"])
    for group in GROUPS:
        _put(estate, group, "f1.parquet", seed=7)  # other content under the same name
    _check(estate, _run(), "full (1 file(s) changed since the previous output (e.g. ")
    for group in GROUPS:
        _remove(estate, group, "f0.parquet")
    _check(estate, _run(), "full (1 file(s) removed since the previous output (e.g. {group}/f0.parquet)")


def test_an_object_fingerprint_equals_the_local_files(estate):
    root, _ = estate
    _put(estate, "aligned", "f0.parquet", seed=1)
    assert fingerprint(f"s3://{BUCKET}/data/aligned/f0.parquet") == fingerprint(str(root / "aligned" / "f0.parquet"))

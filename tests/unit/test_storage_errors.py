"""How object store failures are classified (pure: the messages the clients raise, as seen over HTTP)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from throttler import storage
from throttler.errors import DataError
from throttler.service.outcome import PERMANENT, TRANSIENT, classify

KEY = "When reading information for key 'data/g/f.parquet' in bucket 'b': "


@pytest.mark.parametrize("message, kind", [
    (KEY + "AWS Error ACCESS_DENIED during HeadObject operation: No response body.", storage.DENIED),
    (("When listing objects under key 'x/' in bucket 'nob': AWS Error NO_SUCH_BUCKET during ListObjectsV2 "
      "operation: The specified bucket does not exist"), storage.MISSING),
    (KEY + "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.", storage.DENIED),
    (KEY + "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.", storage.TRANSIENT),
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ", storage.TRANSIENT),
    ("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.", storage.TRANSIENT),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)",
     storage.TRANSIENT),
    (KEY + "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server",
     storage.TRANSIENT),
    ("Couldn't deserialize thrift: TProtocolException: Invalid data", None),
])
def test_pyarrow_s3_messages(message, kind):
    assert storage.store_failure(OSError(message)) == kind


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("exc, kind", [
    (_client_error("AccessDenied", 403), storage.DENIED),
    (_client_error("NoSuchBucket", 404), storage.MISSING),
    (_client_error("SlowDown", 503), storage.TRANSIENT),
    (_client_error("InternalError", 500), storage.TRANSIENT),
    (_client_error("InvalidArgument", 400), None),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), storage.TRANSIENT),
    (ValueError("not a store error"), None),
])
def test_botocore_errors(exc, kind):
    assert storage.store_failure(exc) == kind


def test_refusals_are_permanent_data_errors_and_outages_are_transient_for_the_retry_policy():
    url = "s3://b/data/g/f.parquet"
    denied = storage.store_error(OSError(KEY + "AWS Error ACCESS_DENIED during GetObject operation: x"), url)
    assert isinstance(denied, DataError) and classify(denied) == PERMANENT
    assert str(denied) == f"{url}: access denied by the object store ({KEY}AWS Error ACCESS_DENIED during " \
                          "GetObject operation: x)"
    outage = storage.store_error(_client_error("SlowDown", 503), url)
    assert type(outage) is OSError and classify(outage) == TRANSIENT
    assert str(outage).startswith(f"{url}: object store unavailable after {storage.S3_REQUEST_MAX_ATTEMPTS} attempts")
    assert storage.store_error(FileNotFoundError(2, "gone"), "/local/f.parquet") is None  # local: the caller's rule
    assert storage.store_error(ValueError("x"), url) is None


def _no_cloud_variables(monkeypatch):
    """The system tests' emulator variables (session fixtures) do not apply here."""
    from throttler import cloud_stores

    monkeypatch.delenv(cloud_stores.GCS_EMULATOR_ENV, raising=False)
    monkeypatch.delenv(cloud_stores.AZURE_CONNECTION_ENV, raising=False)
    monkeypatch.setattr(storage, "_filesystems", {})


def test_gs_and_abfs_urls_go_to_pyarrows_own_file_systems_without_a_request(monkeypatch):
    import pyarrow.fs as pafs

    _no_cloud_variables(monkeypatch)

    fs, inner = storage.split("gs://estate/data/G/f.parquet")
    assert isinstance(fs, pafs.GcsFileSystem) and inner == "estate/data/G/f.parquet"
    fs, inner = storage.split("abfss://estate@account.dfs.core.windows.net/data/G/f.parquet")
    assert isinstance(fs, pafs.AzureFileSystem) and inner == "estate/data/G/f.parquet"
    assert storage.join("abfs://estate@account.dfs.core.windows.net/data", "G") == \
        "abfs://estate@account.dfs.core.windows.net/data/G"


@pytest.mark.parametrize("url, message", [
    ("abfs://estate/data", ("abfs://estate: AzureOptions doesn't contain a valid account name (Azure: "
                            "abfs://<container>@<account>.dfs.core.windows.net/...)")),
    ("abfs://estate:key@account.dfs.core.windows.net/data", "credentials or options in a URL are refused"),
    ("s3://user@bucket/data", "credentials or options in a URL are refused"),
    ("gs://bucket/data?access_token=x", "credentials or options in a URL are refused"),
])
def test_unusable_object_store_urls_are_clear_storage_errors(url, message, monkeypatch):
    _no_cloud_variables(monkeypatch)
    with pytest.raises(storage.StorageError) as refused:
        storage.split(url)
    assert message in str(refused.value)
    assert ":key@" not in str(refused.value) and "access_token" not in str(refused.value)


def test_every_readable_object_scheme_is_writable():
    assert storage.WRITE_SCHEMES == storage.OBJECT_SCHEMES

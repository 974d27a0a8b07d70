"""Pointing at GCS and Azure from the clouds' standard variables, and classifying their failures (pure)."""

from __future__ import annotations

import pytest

from throttler import cloud_stores, storage

ACCOUNT_KEY = "c2VjcmV0LWtleQ=="


def test_an_emulator_connection_string_gives_a_path_style_endpoint(monkeypatch):
    monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV, "DefaultEndpointsProtocol=http;AccountName=dev;"
                       f"AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:10000/dev;")
    assert cloud_stores.azure_options("c@dev.dfs.core.windows.net") == {
        "account_name": "dev", "account_key": ACCOUNT_KEY, "blob_storage_scheme": "http",
        "dfs_storage_scheme": "http", "blob_storage_authority": "127.0.0.1:10000",
        "dfs_storage_authority": "127.0.0.1:10000"}


def test_a_cloud_connection_string_keeps_azures_own_host_names(monkeypatch):
    monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV, "DefaultEndpointsProtocol=https;AccountName=acct;"
                       "SharedAccessSignature=?sv=2024&sig=abc%3D;EndpointSuffix=core.windows.net")
    assert cloud_stores.azure_options("c") == {
        "account_name": "acct", "sas_token": "sv=2024&sig=abc%3D", "blob_storage_scheme": "https",
        "dfs_storage_scheme": "https", "blob_storage_authority": ".blob.core.windows.net",
        "dfs_storage_authority": ".dfs.core.windows.net"}
    monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV,
                       f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint=https://acct.blob.core.windows.net/")
    assert cloud_stores.azure_options("c")["blob_storage_authority"] == ".blob.core.windows.net"


def test_use_development_storage_means_azurites_defaults(monkeypatch):
    monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV, "UseDevelopmentStorage=true")
    options = cloud_stores.azure_options("c")
    assert (options["account_name"], options["account_key"], options["blob_storage_authority"]) == (
        cloud_stores.AZURITE_ACCOUNT, cloud_stores.AZURITE_KEY, "127.0.0.1:10000")


def test_no_connection_string_leaves_azure_to_pyarrows_default_credential(monkeypatch):
    monkeypatch.delenv(cloud_stores.AZURE_CONNECTION_ENV, raising=False)
    assert cloud_stores.azure_options("c@acct.dfs.core.windows.net") is None


def test_a_url_naming_another_account_is_refused_without_showing_the_key(monkeypatch):
    monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV, f"AccountName=acct;AccountKey={ACCOUNT_KEY}")
    monkeypatch.setattr(storage, "_filesystems", {})
    with pytest.raises(storage.StorageError) as refused:
        storage.split("abfs://c@other.dfs.core.windows.net/data")
    assert str(refused.value) == ("abfs://c@other.dfs.core.windows.net: the URL names account 'other', "
                                  "AZURE_STORAGE_CONNECTION_STRING account 'acct'")
    with pytest.raises(storage.StorageError, match="names no AccountName"):
        monkeypatch.setenv(cloud_stores.AZURE_CONNECTION_ENV, f"AccountKey={ACCOUNT_KEY}")
        storage.split("abfs://c2@acct.dfs.core.windows.net/data")


@pytest.mark.parametrize("host, scheme, endpoint", [("http://127.0.0.1:4443", "http", "127.0.0.1:4443"),
                                                    ("localhost:9023", "http", "localhost:9023")])
def test_storage_emulator_host_points_gcs_at_the_emulator_anonymously(monkeypatch, host, scheme, endpoint):
    monkeypatch.setenv(cloud_stores.GCS_EMULATOR_ENV, host)
    options = cloud_stores.gcs_filesystem().__reduce__()[1][0]  # what pickling ships to a worker
    assert (options["anonymous"], options["scheme"], options["endpoint_override"]) == (True, scheme, endpoint)
    assert options["retry_time_limit"].total_seconds() == cloud_stores.GCS_RETRY_LIMIT_SECONDS


@pytest.mark.parametrize("message, kind", [
    ("google::cloud::Status(PERMISSION_DENIED: Permanent error, with a last message of Forbidden)", storage.DENIED),
    ("google::cloud::Status(UNAVAILABLE: Retry policy exhausted, with a last message of 503)", storage.TRANSIENT),
    ("GetProperties failed for 'c/x'. Azure Error: [AuthorizationFailure] 403 This request is not authorized",
     storage.DENIED),
    ("GetProperties failed for 'c/x'. Azure Error: [ServerBusy] 503 The server is busy", storage.TRANSIENT),
    ("google::cloud::Status(INVALID_ARGUMENT: bad)", None),
])
def test_pyarrow_gcs_and_azure_messages(message, kind):
    assert storage.store_failure(OSError(message)) == kind


def test_sdk_errors_are_classified_by_their_http_status():
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
    from google.api_core import exceptions as google

    assert storage.store_failure(google.Forbidden("no")) == storage.DENIED
    assert storage.store_failure(google.NotFound("no bucket")) == storage.MISSING
    assert storage.store_failure(google.ServiceUnavailable("busy")) == storage.TRANSIENT
    assert storage.store_failure(google.BadRequest("bad")) is None
    denied = ClientAuthenticationError("no")
    denied.status_code = 403
    assert storage.store_failure(denied) == storage.DENIED
    busy = HttpResponseError("busy")
    busy.status_code = 503
    assert storage.store_failure(busy) == storage.TRANSIENT
    assert storage.store_failure(ServiceRequestError("connection refused")) == storage.TRANSIENT

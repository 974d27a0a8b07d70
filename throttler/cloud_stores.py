"""Google Cloud Storage and Azure Blob Storage: where to connect, and whole-or-nothing writes.

:mod:`throttler.storage` calls into here for ``gs://`` and ``abfs[s]://`` URLs.

* **Where to connect.** pyarrow's own URI resolution knows each cloud's real
  endpoints and default credential chains, but honours no emulator or
  connection variable (tried with pyarrow 26: with ``STORAGE_EMULATOR_HOST`` or
  ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` pointing at a running emulator, reading an
  object on it through ``FileSystem.from_uri("gs://b")`` had not returned after
  20 s). So the two standard variables the clouds' own tools use are mapped here:

  - ``STORAGE_EMULATOR_HOST`` (``http://host:port``; google-cloud-storage, gcsfs
    and the Go client honour it): GCS at that endpoint, anonymously;
  - ``AZURE_STORAGE_CONNECTION_STRING`` (the Azure CLI's, azcopy's, adlfs's):
    the account, its key or SAS token, and the blob endpoint it names
    (``BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1`` for Azurite;
    ``UseDevelopmentStorage=true`` for Azurite's defaults).

  Without them: GCS's application default credentials
  (``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server, workload identity),
  and Azure's ``DefaultAzureCredential`` (``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/
  ``AZURE_CLIENT_SECRET``, workload or managed identity, the Azure CLI's login).
  Secrets stay in the environment: never in a URL, a record or a log line.

* **Writes.** pyarrow's output streams are not whole-or-nothing on these
  stores (measured against the emulators: a ``with fs.open_output_stream(...)``
  block left by an exception after 5 MB or 20 MB had been written leaves an
  object of exactly those bytes, because closing the stream, which the ``with``
  block and the destructor both do, finalises the GCS resumable upload or
  commits the Azure block list; the Azure stream also creates an empty blob
  when opened). So outputs are written with each cloud's own SDK, from the
  fully encoded bytes:

  - GCS (google-cloud-storage ``upload_from_string``): one multipart request up
    to 8 MiB, above that a resumable upload whose object exists only once the
    last chunk, declaring the total size, has arrived. A failed or killed upload
    leaves an unfinished session, which is not an object (GCS drops it after a
    week);
  - Azure (azure-storage-blob ``upload_blob``): one Put Blob up to 64 MiB,
    above that Put Block requests and one Put Block List at the end. Blocks not
    in a committed list are not part of any blob (Azure drops them after a week).

  Either way the object a reader sees is the previous one or the new one, whole.
"""

from __future__ import annotations

import datetime
import os
import threading
from urllib.parse import urlsplit

import pyarrow.fs as pafs

GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
AZURE_CONNECTION_ENV = "AZURE_STORAGE_CONNECTION_STRING"
#: The GCS client's own retry budget per request (throttling, 5xx, dropped
#: connections; google-cloud-cpp's default is 15 minutes). What is left is an
#: outage, retried by the group's retry policy, as on S3.
GCS_RETRY_LIMIT_SECONDS = 60.0
#: GCS resumable upload chunk (a multiple of 256 KiB; the SDK's default is 100 MiB).
#: Objects up to 8 MiB go in one multipart request instead.
GCS_CHUNK_BYTES = 64 * 2**20
#: Azure: blobs up to this size are one Put Blob (the SDK's default); larger ones are
#: staged in blocks of :data:`AZURE_BLOCK_BYTES`, then committed by one Put Block List.
AZURE_SINGLE_PUT_BYTES = 64 * 2**20
AZURE_BLOCK_BYTES = 8 * 2**20
#: Azurite's well-known development account (public, in Microsoft's docs): what
#: ``UseDevelopmentStorage=true`` means.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_AZURE_DOMAINS = (".dfs.core.windows.net", ".blob.core.windows.net")

_lock = threading.Lock()
_clients: dict[tuple, object] = {}


class CloudConfigError(ValueError):
    """The environment names a store in a way that cannot be used (raised as a StorageError by the caller)."""


# --------------------------------------------------------------------------- where to connect

def gcs_filesystem() -> pafs.GcsFileSystem:
    """GCS at ``STORAGE_EMULATOR_HOST`` (anonymous), else Google's servers with default credentials."""
    retry = datetime.timedelta(seconds=GCS_RETRY_LIMIT_SECONDS)
    host = os.environ.get(GCS_EMULATOR_ENV)
    if not host:
        return pafs.GcsFileSystem(retry_time_limit=retry)
    parts = urlsplit(host if "://" in host else f"http://{host}")
    return pafs.GcsFileSystem(anonymous=True, scheme=parts.scheme, endpoint_override=parts.netloc,
                              retry_time_limit=retry)


def connection_fields(text: str) -> dict[str, str]:
    """The ``Key=Value;...`` fields of an Azure connection string (values may hold ``=``)."""
    fields = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    if fields.get("UseDevelopmentStorage", "").lower() == "true":
        fields = {"AccountName": AZURITE_ACCOUNT, "AccountKey": AZURITE_KEY,
                  "BlobEndpoint": f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}", **fields}
    if not fields.get("AccountName"):
        raise CloudConfigError(f"{AZURE_CONNECTION_ENV} names no AccountName")
    return fields


def url_account(netloc: str) -> str | None:
    """The account an Azure URL names (``<container>@<account>.dfs.core.windows.net``), if any."""
    host = netloc.rpartition("@")[2]
    for domain in _AZURE_DOMAINS:
        if host.endswith(domain):
            return host[:-len(domain)]
    return None


def azure_options(netloc: str) -> dict | None:
    """``AzureFileSystem`` keyword arguments from ``AZURE_STORAGE_CONNECTION_STRING``; None when unset."""
    text = os.environ.get(AZURE_CONNECTION_ENV)
    if not text:
        return None
    fields = connection_fields(text)
    account = fields["AccountName"]
    named = url_account(netloc)
    if named is not None and named != account:
        raise CloudConfigError(f"the URL names account {named!r}, {AZURE_CONNECTION_ENV} account {account!r}")
    scheme, authority = _blob_endpoint(fields, account)
    options = {"account_name": account, "blob_storage_scheme": scheme, "dfs_storage_scheme": scheme,
               "blob_storage_authority": authority,
               "dfs_storage_authority": authority.replace(".blob.", ".dfs.", 1)}
    if fields.get("AccountKey"):
        options["account_key"] = fields["AccountKey"]
    elif fields.get("SharedAccessSignature"):
        options["sas_token"] = fields["SharedAccessSignature"].lstrip("?")
    return options


def _blob_endpoint(fields: dict[str, str], account: str) -> tuple[str, str]:
    """(scheme, authority) as pyarrow takes them: ``.blob.<suffix>`` for Azure's own hosts (pyarrow
    puts the account in front), ``host:port`` for an emulator (pyarrow puts the account in the path)."""
    endpoint = fields.get("BlobEndpoint")
    if not endpoint:
        return fields.get("DefaultEndpointsProtocol", "https"), ".blob." + fields.get("EndpointSuffix",
                                                                                    "core.windows.net")
    parts = urlsplit(endpoint)
    if parts.hostname and parts.hostname.startswith(account + ".blob."):
        return parts.scheme or "https", parts.netloc[len(account):]
    return parts.scheme or "https", parts.netloc


# --------------------------------------------------------------------------- whole-or-nothing writes

def write_gcs(bucket: str, key: str, data: bytes | memoryview) -> None:
    """One object from the whole of ``data`` (google-cloud-storage; see the module's doc)."""
    blob = _gcs_client().bucket(bucket).blob(key, chunk_size=GCS_CHUNK_BYTES)
    from google.cloud.storage.retry import DEFAULT_RETRY

    # Retried on throttling, 5xx and dropped connections (the SDK retries uploads only when asked:
    # sending the same whole bytes again is safe, the object is replaced by the same content).
    blob.upload_from_string(bytes(data), content_type="application/octet-stream", retry=DEFAULT_RETRY)


def write_azure(netloc: str, container: str, key: str, data: bytes | memoryview) -> None:
    """One blob from the whole of ``data`` (azure-storage-blob; see the module's doc)."""
    blob = _azure_client(netloc).get_blob_client(container, key)
    blob.upload_blob(bytes(data), overwrite=True)


def gcs_directories(bucket: str, key: str) -> list[str]:
    """Names of the common prefixes directly under ``key`` (one listing with a ``/`` delimiter, paged)."""
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    pages = _gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
    for _page in pages.pages:  # the prefixes are gathered as the pages are read
        pass
    return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes if not p[len(prefix):].startswith("."))


def delete_azure(netloc: str, container: str, key: str) -> None:
    """Delete a blob (no error if it is already gone)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        _azure_client(netloc).get_blob_client(container, key).delete_blob()
    except ResourceNotFoundError:
        pass


def _gcs_client():
    """One client per process, pointed like :func:`gcs_filesystem` (the SDK reads ``STORAGE_EMULATOR_HOST``)."""
    key = ("gs", os.getpid(), os.environ.get(GCS_EMULATOR_ENV))
    with _lock:
        client = _clients.get(key)
        if client is None:
            from google.cloud import storage as gcs

            client = _clients[key] = gcs.Client()
    return client


def _azure_client(netloc: str):
    """One service client per process and account: the connection string, else DefaultAzureCredential."""
    text = os.environ.get(AZURE_CONNECTION_ENV)
    key = ("abfs", os.getpid(), netloc, text, AZURE_SINGLE_PUT_BYTES, AZURE_BLOCK_BYTES)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_azure_client(netloc, text)
    return client


def _new_azure_client(netloc: str, text: str | None):
    from azure.storage.blob import BlobServiceClient

    sizes = {"max_single_put_size": AZURE_SINGLE_PUT_BYTES, "max_block_size": AZURE_BLOCK_BYTES}
    if text:
        azure_options(netloc)  # refuses a URL naming another account than the connection string
        return BlobServiceClient.from_connection_string(text, **sizes)
    account = url_account(netloc)
    if account is None:
        raise CloudConfigError("an Azure URL without an account (<container>@<account>.dfs.core.windows.net) "
                               f"needs {AZURE_CONNECTION_ENV}")
    from azure.identity import DefaultAzureCredential

    return BlobServiceClient(f"https://{account}.blob.core.windows.net", credential=DefaultAzureCredential(),
                             **sizes)


# --------------------------------------------------------------------------- errors

DENIED, MISSING, TRANSIENT = "denied", "missing", "transient"

#: google-cloud-cpp status codes and Azure error codes, as pyarrow's messages carry them.
_DENIED_TEXT = ("PERMISSION_DENIED", "UNAUTHENTICATED", "AuthorizationFailure", "AuthenticationFailed",
                "AuthorizationPermissionMismatch", "403 Forbidden", "401 Unauthorized")
_MISSING_TEXT = ("NOT_FOUND", "ContainerNotFound", "BlobNotFound", "404 The specified")
_TRANSIENT_TEXT = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "ServerBusy", "OperationTimedOut",
                   "InternalError", "503 ", "500 ")


def failure_kind(exc: BaseException) -> str | None:
    """DENIED, MISSING, TRANSIENT for a failed GCS or Azure request (pyarrow's or an SDK's), else None."""
    module = type(exc).__module__ or ""
    if module.startswith(("google.", "azure.")):
        return _sdk_kind(exc)
    if not isinstance(exc, OSError) or exc.errno is not None:
        return None
    text = str(exc)
    if "google::cloud::Status" not in text and "Azure Error" not in text:
        return None
    for kind, names in ((DENIED, _DENIED_TEXT), (MISSING, _MISSING_TEXT), (TRANSIENT, _TRANSIENT_TEXT)):
        if any(name in text for name in names):
            return kind
    return None


def _sdk_kind(exc: BaseException) -> str | None:
    status = getattr(exc, "code", None) if type(exc).__module__.startswith("google.") else None
    status = status if isinstance(status, int) else getattr(exc, "status_code", None)
    if not isinstance(status, int):  # connection refused or dropped, timeouts: no answer at all
        names = {cls.__name__ for cls in type(exc).__mro__}
        transient = {"ServiceRequestError", "ServiceResponseError", "RetryError", "ConnectionError", "Timeout"}
        return TRANSIENT if names & transient else None
    if status in (401, 403):
        return DENIED
    if status == 404:
        return MISSING
    return TRANSIENT if status == 429 or status >= 500 else None

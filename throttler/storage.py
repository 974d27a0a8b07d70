"""Where data and outputs live: a local path, ``file://`` or an object store URL.

Every read of an input file and every write of an output goes through here, so
the rest of the code handles ``s3://bucket/estate/G/f.parquet`` exactly like
``/data/estate/G/f.parquet``.

* Reads use pyarrow's file systems (``pyarrow.fs.FileSystem.from_uri``): local
  files are memory-mapped; object store files are opened as random-access
  files whose ``read_at`` is one ranged GET, so a footer or a key column costs
  a few requests, not the whole object. pyarrow's S3 client takes credentials
  from the standard AWS chain (environment, config files, instance or workload
  identity) and ``AWS_ENDPOINT_URL`` for S3-compatible stores, and retries
  throttling, 5xx answers and dropped connections itself (its standard retry
  strategy, :data:`S3_REQUEST_MAX_ATTEMPTS` attempts a request). What is left is
  classified by :func:`store_failure`: refusals and missing objects become
  :class:`ObjectAccessError` (permanent, per group), outages stay OSErrors
  (retried by the group's retry policy). ``gs://`` and ``abfs[s]://`` go to
  pyarrow's own GCS and Azure file systems (an Azure URL names its container
  before the ``@``: :func:`bucket_of`).
* Writes of an S3 object are one ``PutObject`` of the fully encoded bytes
  (boto3, the same credential chain): the object appears whole or not at all,
  and no multipart upload exists to be orphaned. pyarrow's own output stream
  is not used for this: it switches to a multipart upload past its part size,
  and closing it (which its ``with`` block and its destructor both do, even on
  an exception) completes the upload with whatever parts were sent.
* Writes to GCS and Azure go through the clouds' own SDKs, whole or not at all
  too (:mod:`throttler.cloud_stores`, which also maps ``STORAGE_EMULATOR_HOST``
  and ``AZURE_STORAGE_CONNECTION_STRING``).
* A URL carrying credentials (``user:secret@host`` or a query string) is
  refused: secrets come from the environment, never from a path that ends up
  in records, logs and metric labels.
"""

from __future__ import annotations

import os
import posixpath
import threading
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from throttler import cloud_stores
from throttler.errors import DataError, first_line

#: Schemes read through pyarrow's file systems (besides plain paths and ``file://``).
OBJECT_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")
#: Schemes outputs can be written to, whole or not at all (S3: one PUT; GCS and
#: Azure: their SDKs' uploads, :mod:`throttler.cloud_stores`).
WRITE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")

_lock = threading.Lock()
_filesystems: dict[tuple[str, str], pafs.FileSystem] = {}
_s3_clients: dict[int, object] = {}


class StorageError(ValueError):
    """A URL this module refuses (credentials in it, unknown scheme)."""


class ObjectAccessError(DataError):
    """Permanent: the store refused an object or bucket (403), or it does not exist (404, no bucket).

    A per-group error: the failed record names the object; never retried as an outage.
    """


def is_url(path: str | os.PathLike) -> bool:
    """True for an object store URL (``file://`` and plain paths are local)."""
    return urlsplit(str(path)).scheme in OBJECT_SCHEMES


def local_path(path: str | os.PathLike) -> str:
    """A plain path for a local path or ``file://`` URL."""
    text = str(path)
    return urlsplit(text).path if text.startswith("file://") else text


def check_url(url: str) -> None:
    """Refuse a URL with credentials or options in it, or of a scheme not handled."""
    parts = urlsplit(url)
    if parts.scheme not in OBJECT_SCHEMES:
        raise StorageError(f"{url}: unsupported scheme {parts.scheme!r} (use {', '.join(OBJECT_SCHEMES)})")
    if parts.query or parts.password or ("@" in parts.netloc and not is_azure_container(parts)):
        raise StorageError(f"{parts.scheme}://{parts.hostname or ''}/...: credentials or options in a URL are "
                           "refused; give them through the environment or the cloud's credential chain")
    if not parts.netloc:
        raise StorageError(f"{url}: no bucket or container")


def split(url: str) -> tuple[pafs.FileSystem, str]:
    """The (file system, path inside it) of an object store URL; file systems are cached per bucket."""
    check_url(url)
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc)
    with _lock:
        fs = _filesystems.get(key)
    if fs is None:
        fs = _new_filesystem(parts.scheme, parts.netloc)
        with _lock:
            fs = _filesystems.setdefault(key, fs)
    return fs, posixpath.normpath(bucket_of(parts) + "/" + parts.path.lstrip("/")).rstrip("/")


def join(root: str | os.PathLike, *names: str) -> str:
    """``root`` joined with ``names`` (``/`` for URLs, the OS's separator for paths)."""
    root = str(root)
    if is_url(root):
        return "/".join([root.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(local_path(root), *names)


def normalise(path: str) -> str:
    """A URL with ``.`` and ``..`` collapsed (scheme://bucket/key), or a resolved local path."""
    if not is_url(path):
        return os.path.realpath(local_path(path))
    parts = urlsplit(path)
    key = posixpath.normpath("/" + parts.path.lstrip("/"))
    return f"{parts.scheme}://{parts.netloc}{key.rstrip('/') if key != '/' else ''}"


def open_input(path: str) -> pa.NativeFile:
    """A random-access file of ``path``: memory-mapped locally, ranged GETs on an object store."""
    if not is_url(path):
        return pa.memory_map(local_path(path), "r")
    fs, inner = split(path)
    try:
        return fs.open_input_file(inner)
    except FileNotFoundError as exc:  # GCS's and Azure's do not name the object
        raise exc if exc.filename else FileNotFoundError(2, "no such object", path) from None


def size_bytes(path: str) -> int:
    """The size of a file or object; FileNotFoundError if there is none."""
    if not is_url(path):
        return os.path.getsize(local_path(path))
    fs, inner = split(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "no such object", path)
    return info.size


def list_files(prefix: str, suffix: str) -> list[str]:
    """URLs of the objects directly under ``prefix`` ending in ``suffix``, sorted.

    pyarrow's selector follows the listing's continuation tokens (pagination).
    FileNotFoundError when nothing is under the prefix; OSError for a missing
    bucket or a refused listing.
    """
    fs, inner = split(prefix)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    scheme_bucket = prefix[:len(prefix) - len(urlsplit(prefix).path)]
    bucket = bucket_of(urlsplit(prefix))
    return sorted(f"{scheme_bucket}{info.path[len(bucket):]}" for info in infos
                  if info.type == pafs.FileType.File and info.base_name.endswith(suffix))


def list_directories(prefix: str) -> list[str]:
    """Names of the 'directories' (common prefixes) directly under ``prefix``."""
    fs, inner = split(prefix)
    if urlsplit(prefix).scheme in ("gs", "gcs"):  # pyarrow's GCS listing drops common prefixes
        bucket, _, key = inner.partition("/")
        return cloud_stores.gcs_directories(bucket, key)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))


def check_reachable(url: str) -> None:
    """Raise OSError (missing bucket, refused) unless ``url``'s bucket answers a listing of ``url``.

    A prefix with nothing under it yet is fine (an output prefix starts empty).
    """
    fs, inner = split(url)
    bucket = bucket_of(urlsplit(url))
    if fs.get_file_info(bucket).type != pafs.FileType.Directory:
        raise FileNotFoundError(2, f"bucket {bucket!r} does not exist")
    fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))


def write_object(url: str, data: bytes | memoryview) -> int:
    """Write ``data`` as the object ``url`` with one PUT (whole or nothing); returns its size."""
    parts = urlsplit(url)
    check_url(url)
    if parts.scheme not in WRITE_SCHEMES:
        raise StorageError(f"{url}: outputs can be written to {', '.join(WRITE_SCHEMES)} URLs or local paths")
    try:
        if parts.scheme in ("gs", "gcs"):
            cloud_stores.write_gcs(parts.netloc, parts.path.lstrip("/"), data)
        elif parts.scheme in ("abfs", "abfss"):
            cloud_stores.write_azure(parts.netloc, bucket_of(parts), parts.path.lstrip("/"), data)
        else:
            _s3_client().put_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"), Body=bytes(data))
    except cloud_stores.CloudConfigError as exc:
        raise StorageError(f"{parts.scheme}://{parts.netloc}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - botocore's errors are classified, others re-raised
        raise (store_error(exc, url) or exc) from None
    return len(data)


def _s3_client():
    """One boto3 S3 client per process (boto3 is imported only when an S3 output is written)."""
    pid = os.getpid()
    with _lock:
        client = _s3_clients.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config

            retries = {"mode": "standard", "total_max_attempts": S3_REQUEST_MAX_ATTEMPTS}
            client = _s3_clients[pid] = boto3.session.Session().client("s3", config=Config(retries=retries))
    return client


def copy_object(source_url: str, target_url: str) -> None:
    """Copy an object inside its store, server-side (S3: one ``CopyObject``).

    The copy is one whole version of the source as it was when the copy ran,
    however often the source is replaced afterwards. FileNotFoundError if the
    source is gone.
    """
    fs, source = split(source_url)
    target_fs, target = split(target_url)
    if target_fs is not fs:
        raise StorageError(f"{target_url}: a copy stays in the bucket of {source_url}")
    if fs.get_file_info(source).type != pafs.FileType.File:
        raise FileNotFoundError(2, "no such object", source_url)
    fs.copy_file(source, target)


def list_prefixed(url_prefix: str) -> list[str]:
    """URLs of the objects whose key starts with ``url_prefix``'s key (any characters after it)."""
    check_url(url_prefix)
    parts = urlsplit(url_prefix)
    if parts.scheme != "s3":  # GCS, Azure: the prefix's 'directory', its names filtered
        directory, _, start = url_prefix.rpartition("/")
        fs, inner = split(directory)
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        return [f"{directory}/{info.base_name}" for info in infos
                if info.type == pafs.FileType.File and info.base_name.startswith(start)]
    pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=parts.netloc,
                                                                    Prefix=parts.path.lstrip("/"))
    return [f"{parts.scheme}://{parts.netloc}/{item['Key']}" for page in pages for item in page.get("Contents", [])]


def delete_object(url: str) -> None:
    """Delete an object (no error if it is already gone)."""
    check_url(url)
    parts = urlsplit(url)
    if parts.scheme in ("abfs", "abfss"):  # pyarrow's would leave a marker blob for the 'directory'
        cloud_stores.delete_azure(parts.netloc, bucket_of(parts), parts.path.lstrip("/"))
        return
    if parts.scheme != "s3":
        fs, inner = split(url)
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            pass
        return
    _s3_client().delete_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))


# --------------------------------------------------------------------------- retries and store errors

#: Attempts per request (the first one included) of the S3 clients' own retry
#: logic, pyarrow's (AWS standard strategy: exponential backoff with jitter on
#: throttling, 5xx and dropped connections) and botocore's ("standard" mode).
#: Failures left after these are retried as outages by the group's retry policy.
S3_REQUEST_MAX_ATTEMPTS = 6


def _new_filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    """The file system of one bucket: pyarrow's own URI resolution (region, ``AWS_ENDPOINT_URL``),
    then, for S3, the same options with :data:`S3_REQUEST_MAX_ATTEMPTS` as its retry strategy.
    GCS and Azure read the clouds' emulator and connection variables (:mod:`throttler.cloud_stores`)."""
    try:
        if scheme in ("gs", "gcs"):
            return cloud_stores.gcs_filesystem()
        azure = cloud_stores.azure_options(netloc) if scheme in ("abfs", "abfss") else None
        fs = pafs.AzureFileSystem(**azure) if azure else pafs.FileSystem.from_uri(f"{scheme}://{netloc}")[0]
    except cloud_stores.CloudConfigError as exc:
        raise StorageError(f"{scheme}://{netloc}: {exc}") from None
    except pa.ArrowNotImplementedError as exc:  # a pyarrow built without this file system
        raise StorageError(f"{scheme}:// URLs need pyarrow built with that file system; this pyarrow "
                           f"{pa.__version__} has none ({exc})") from None
    except pa.ArrowInvalid as exc:
        raise StorageError(f"{scheme}://{netloc}: {exc} (Azure: abfs://<container>@<account>.dfs.core.windows.net/"
                           "...)") from None
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]  # the resolved options, as pickling ships them to workers
        fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(
            max_attempts=S3_REQUEST_MAX_ATTEMPTS))
    return fs


DENIED, MISSING, TRANSIENT = "denied", "missing", "transient"

#: aws-sdk-cpp error names (as pyarrow's messages carry them: ``AWS Error <NAME> during ...``).
_AWS_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "MISSING_AUTHENTICATION_TOKEN",
               "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "HTTP status 401", "HTTP status 403")
_AWS_MISSING = ("NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "HTTP status 404")
_AWS_TRANSIENT = ("SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "REQUEST_TIMEOUT", "NETWORK_CONNECTION",
                  "REQUEST_LIMIT_EXCEEDED", "INTERNAL_FAILURE", "HTTP status 429", "HTTP status 5")
#: botocore error codes.
_BOTO_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "403", "401")
_BOTO_MISSING = ("NoSuchBucket", "NoSuchKey", "404")


def store_failure(exc: BaseException) -> str | None:
    """DENIED, MISSING, TRANSIENT for a failed object store request, None for anything else.

    TRANSIENT includes aws-sdk-cpp's INTERNAL_FAILURE "Failed to flush response
    stream": a throttled (429/503) answer to a ranged GET shorter than the error's
    XML body overflows the caller's buffer, the status is lost, and the SDK does not
    retry it; it is an overload, not a fault of the data.
    """
    if isinstance(exc, FileNotFoundError):
        return MISSING
    if isinstance(exc, OSError) and exc.errno is None and "AWS Error " in str(exc):
        return _aws_kind(str(exc))
    return _boto_kind(exc) or cloud_stores.failure_kind(exc)


def _aws_kind(message: str) -> str | None:
    for kind, names in ((DENIED, _AWS_DENIED), (MISSING, _AWS_MISSING), (TRANSIENT, _AWS_TRANSIENT)):
        if any(f"AWS Error {name}" in message or f"({name}" in message for name in names):
            return kind
    return None


def _boto_kind(exc: BaseException) -> str | None:
    module = type(exc).__module__ or ""
    if not module.startswith("botocore"):
        return None
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):  # connection errors, timeouts: no answer at all
        return TRANSIENT
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _BOTO_DENIED or status in (401, 403):
        return DENIED
    if code in _BOTO_MISSING or status == 404:
        return MISSING
    return TRANSIENT if status == 429 or status >= 500 or code in ("SlowDown", "Throttling") else None


def store_error(exc: BaseException, url: str) -> Exception | None:
    """What to raise for ``exc``, a failed request about ``url``: an :class:`ObjectAccessError`
    naming it (refused, missing), an OSError naming it (an outage: the group is retried), or None
    when ``exc`` is not an object store failure (the caller's own handling applies)."""
    kind = store_failure(exc)
    if kind is None or (kind == MISSING and not is_url(url)):
        return None
    detail = first_line(exc)
    if kind == DENIED:
        return ObjectAccessError(f"{url}: access denied by the object store ({detail})")
    if kind == MISSING:
        return ObjectAccessError(f"{url}: no such object or bucket ({detail})")
    return OSError(f"{url}: object store unavailable after {S3_REQUEST_MAX_ATTEMPTS} attempts ({detail})")


def is_azure_container(parts) -> bool:
    """True for ``abfs[s]://<container>@<account>.dfs.core.windows.net``: the part before ``@`` names
    the container (no password), not a credential."""
    return parts.scheme in ("abfs", "abfss") and bool(parts.username) and parts.password is None


def bucket_of(parts) -> str:
    """The first component of a path inside the URL's file system: the bucket (the container on Azure)."""
    return parts.username if is_azure_container(parts) else parts.netloc

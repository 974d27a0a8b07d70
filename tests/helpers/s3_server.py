"""A real S3 API server on loopback (moto's standalone server), started by the tests.

The server is a subprocess speaking the S3 HTTP API; the code under test talks
to it through pyarrow's and boto3's real clients, pointed at it by
``AWS_ENDPOINT_URL`` (set in this process's environment, so ``throttler``
subprocesses and their Dask workers inherit it). Credentials are dummies.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

from tests.helpers.daemon import free_port


#: one request line of moto's access log (colour codes allowed)
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP')


class S3Server:
    """``moto_server`` on a free loopback port; :meth:`client` gives a boto3 client for it."""

    def __init__(self, log_path: str | None = None):
        """``log_path``: keep the server's access log there (one line a request: :func:`count_requests`)."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(os.sys.executable), "moto_server")
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the server writes it
        try:
            self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if log_path:
                log.close()
        self._wait_ready()

    def _wait_ready(self, timeout_seconds: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not answer within 30 s")

    def environ(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.session.Session().client("s3")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@contextlib.contextmanager
def logged_server():
    """A benchmark's server: its access log in a temporary file (for :func:`count_requests`), its
    endpoint and credentials in os.environ; yields (server, log path); stops it and removes the log."""
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # noqa: SIM115
    log.close()
    server = S3Server(log_path=log.name)
    os.environ.update(server.environ())
    try:
        yield server, log.name
    finally:
        server.stop()
        os.unlink(log.name)


def count_requests(log_path: str) -> collections.Counter:
    """Requests in a server's access log so far, by HTTP method."""
    with open(log_path, errors="replace") as fh:
        return collections.Counter(m.group(1) for m in map(_REQUEST.search, fh) if m)


def upload_estate(s3, bucket: str, root, shuffled: dict[str, bool], n_files: int = 3) -> None:
    """Small groups of ``n_files`` each, written under ``root/<group>/`` and uploaded to
    ``s3://<bucket>/data/<group>/``: the same files on local disk and in the store."""
    from tests.helpers.datafiles import write_sim

    for group, shuffle in shuffled.items():
        (root / group).mkdir()
        for i in range(n_files):
            path = write_sim(root / group / f"f{i}.parquet", 40, 5, seed=i, shuffle=shuffle)
            s3.upload_file(path, bucket, f"data/{group}/f{i}.parquet")

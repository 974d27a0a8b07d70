"""A real S3 API server on loopback (moto's standalone server), started by the tests.

The server is a subprocess speaking the S3 HTTP API; the code under test talks
to it through pyarrow's and boto3's real clients, pointed at it by
``AWS_ENDPOINT_URL`` (set in this process's environment, so ``throttler``
subprocesses and their Dask workers inherit it). Credentials are dummies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

from tests.helpers.daemon import free_port

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class S3Server:
    """``moto_server`` on a free loopback port; :meth:`client` gives a boto3 client for it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server") or os.path.join(os.path.dirname(os.sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

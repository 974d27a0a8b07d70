"""A real HTTP proxy on loopback in front of the moto S3 server, to inject faults.

The code under test talks to the proxy through its ordinary S3 clients
(pyarrow's and boto3's), pointed at it by ``AWS_ENDPOINT_URL``. The proxy
forwards every request to moto unchanged, except that it can:

* answer ``503 SlowDown`` to the next ``n`` requests (:meth:`S3Proxy.fail_next`),
  as a throttled or overloaded store does;
* answer ``403 AccessDenied`` to every request for chosen keys
  (:meth:`S3Proxy.deny`), as a bucket policy refusing one object does;
* hold the next PUT half received (:meth:`S3Proxy.hold_next_upload`), so that
  a writer can be killed while its upload is in flight; the held request is
  dropped when its client goes away, or forwarded once released;
* wait a fixed time before forwarding each request (:meth:`S3Proxy.set_latency`),
  as a cloud store's first-byte latency (tens of ms) that loopback does not have.

It counts requests per method, the bytes of GET bodies it sent, and the most GET
requests it had in flight at once (:attr:`S3Proxy.max_gets_in_flight`: whether a
client overlaps its reads), and keeps each GET's (start, end, body bytes) in
:attr:`S3Proxy.gets` (:func:`most_in_flight` of a subset, e.g. the large ones). It runs as threads of the test process; the
throttler subprocesses and their Dask workers reach it over real TCP.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               '<RequestId>proxy</RequestId></Error>')
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


class S3Proxy:
    """Forwards to ``upstream`` (``http://host:port``) from a free loopback port."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._fail_left = 0
        self._denied: set[str] = set()
        self._deny_all = False
        self._hold_next_put = False
        self.requests: Counter = Counter()
        self.injected: Counter = Counter()
        self.put_held = threading.Event()  #: set while a PUT is held half received
        self.put_released = threading.Event()
        self.puts_dropped = 0  #: held PUTs whose client went away
        self.get_body_bytes = 0  #: bytes of GET response bodies sent to clients
        self.latency_seconds = 0.0  #: waited before forwarding each request
        self.gets_in_flight = 0
        self.max_gets_in_flight = 0  #: the most GETs received and not yet answered at one time
        self.gets: list[tuple[float, float, int]] = []  #: (monotonic start, end, body bytes) of each GET answered
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    def fail_next(self, n: int) -> None:
        """Answer 503 SlowDown to the next ``n`` requests, whatever they are."""
        with self._lock:
            self._fail_left = n

    def deny(self, *keys: str) -> None:
        """Answer 403 AccessDenied to every request for these ``bucket/key`` names."""
        with self._lock:
            self._denied.update(keys)

    def deny_all(self) -> None:
        """Answer 403 AccessDenied to every request (a client whose credentials the store refuses)."""
        with self._lock:
            self._deny_all = True

    def hold_next_upload(self) -> None:
        """Receive half of the next PUT's body, then wait for :meth:`release_upload`."""
        with self._lock:
            self._hold_next_put = True
            self.put_held.clear()
            self.put_released.clear()

    def set_latency(self, seconds: float) -> None:
        """Wait ``seconds`` before forwarding each request (answered faults are not delayed)."""
        with self._lock:
            self.latency_seconds = seconds

    def release_upload(self) -> None:
        self.put_released.set()

    def reset(self) -> None:
        with self._lock:
            self._fail_left, self._hold_next_put = 0, False
            self.put_released.set()
            self._denied.clear()
            self.requests.clear()
            self.injected.clear()
            self.get_body_bytes = 0
            self.max_gets_in_flight = self.gets_in_flight
            self.gets = []

    def environ(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` (the S3 server's environment) pointed at this proxy."""
        return {**base, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, method: str, target: str) -> tuple[int, str, str] | None:
        """The (status, code, message) to answer instead of forwarding, if any."""
        name = unquote(urlsplit(target).path).lstrip("/")
        with self._lock:
            self.requests[method] += 1
            if self._deny_all or name in self._denied:
                self.injected["403"] += 1
                return 403, "AccessDenied", "Access Denied"
            if self._fail_left > 0:
                self._fail_left -= 1
                self.injected["503"] += 1
                return 503, "SlowDown", "Please reduce your request rate."
        return None


def most_in_flight(gets: list[tuple[float, float, int]], min_bytes: int = 0, max_bytes: float = float("inf")) -> int:
    """The most of ``gets`` (:attr:`S3Proxy.gets`) of ``min_bytes`` to ``max_bytes`` that were in flight at one time."""
    chosen = [(start, end) for start, end, n in gets if min_bytes <= n <= max_bytes]
    events = sorted([(start, 1) for start, _ in chosen] + [(end, -1) for _, end in chosen])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def _handler(proxy: S3Proxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._chunked_body()
            length = int(self.headers.get("Content-Length") or 0)
            with proxy._lock:
                hold = self.command == "PUT" and proxy._hold_next_put
                proxy._hold_next_put = proxy._hold_next_put and not hold
            if not hold:
                return self.rfile.read(length)
            head = self.rfile.read(length // 2)
            proxy.put_held.set()
            proxy.put_released.wait(120)
            rest = self.rfile.read(length - len(head))
            if len(head) + len(rest) < length:
                with proxy._lock:
                    proxy.puts_dropped += 1
                raise ConnectionError("client went away mid-upload")
            return head + rest

        def _chunked_body(self) -> bytes:
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)) if self.command != "HEAD" else
                             {k.lower(): v for k, v in headers}.get("content-length", "0"))
            self.end_headers()
            if self.command == "GET":  # counted before sending: a client may be done before the write returns
                self.body_bytes = len(body)
                with proxy._lock:
                    proxy.get_body_bytes += len(body)
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self) -> None:
            if self.command != "GET":
                self._forward_one()
                return
            with proxy._lock:
                proxy.gets_in_flight += 1
                proxy.max_gets_in_flight = max(proxy.max_gets_in_flight, proxy.gets_in_flight)
            started, self.body_bytes = time.monotonic(), 0
            try:
                self._forward_one()
            finally:
                with proxy._lock:
                    proxy.gets_in_flight -= 1
                    proxy.gets.append((started, time.monotonic(), self.body_bytes))

        def _forward_one(self) -> None:
            try:
                body = self._body()
            except ConnectionError:
                self.close_connection = True
                return
            fault = proxy._fault(self.command, self.path)
            if fault is not None:
                status, code, message = fault
                payload = _ERROR_BODY.format(code=code, message=message).encode()
                self._answer(status, [("Content-Type", "application/xml")], payload)
                return
            if proxy.latency_seconds:
                time.sleep(proxy.latency_seconds)
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self._answer(resp.status, resp.getheaders(), data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler

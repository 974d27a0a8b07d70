"""sd_notify client against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid

import pytest

from throttler.ops import sdnotify


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path, monkeypatch):
    """A bound datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = f"throttler-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    sock.settimeout(5)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.mark.parametrize("call, expected", [
    (lambda: sdnotify.ready(), "READY=1"),
    (lambda: sdnotify.ready("serving 0 groups"), "READY=1\nSTATUS=serving 0 groups"),
    (lambda: sdnotify.status("draining 3 groups"), "STATUS=draining 3 groups"),
    (lambda: sdnotify.stopping(), "STOPPING=1"),
    (lambda: sdnotify.watchdog(), "WATCHDOG=1"),
], ids=["ready", "ready-status", "status", "stopping", "watchdog"])
def test_exact_messages(listener, call, expected):
    assert call() is True
    assert receive(listener) == expected


def test_reloading_carries_monotonic_usec(listener):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", receive(listener))
    assert match, "unexpected reload message"
    assert before <= int(match.group(1)) <= after


def test_one_datagram_per_call(listener):
    sdnotify.ready()
    sdnotify.watchdog()
    assert [receive(listener), receive(listener)] == ["READY=1", "WATCHDOG=1"]


def test_noop_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False


def test_send_error_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="throttler.ops.sdnotify"):
        assert sdnotify.stopping() is False
    assert "STOPPING=1" in caplog.text


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
])
def test_watchdog_interval(monkeypatch, env, expected):
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, val in env.items():
        monkeypatch.setenv(key, val.format(pid=os.getpid(), other=os.getpid() + 1))
    assert sdnotify.watchdog_interval_seconds() == expected

"""A tiny sd_notify(3) client: tell systemd we are ready, reloading, stopping, alive.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket)
to a ``Type=notify`` service; each message is one AF_UNIX datagram of
``KEY=VALUE`` lines. Without ``NOTIFY_SOCKET`` (run by hand, in tests) every
call is a no-op. Sending never raises: a lost notification is logged, and
systemd's own timeouts (start, watchdog) are the safety net.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)


def _address() -> str | None:
    """The socket address from ``NOTIFY_SOCKET``, or None when unset."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    return path


def notify(message: str) -> bool:
    """Send one datagram; True if sent, False if no socket or the send failed."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        logger.warning("sd_notify %r failed", message, exc_info=True)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is finished."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status``."""
    return notify(f"STATUS={text}")


def stopping() -> bool:
    """Shutdown has begun (drain)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """A reload has begun; send :func:`ready` when it is done.

    ``MONOTONIC_USEC`` lets systemd 253+ (``Type=notify-reload``) match the
    reload; systemd 252 ignores it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog() -> bool:
    """Keep-alive ping; call at least every :func:`watchdog_interval_seconds`."""
    return notify("WATCHDOG=1")


def watchdog_interval_seconds() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, or None when the watchdog is off for us.

    None when ``WATCHDOG_USEC`` is unset or invalid, or when ``WATCHDOG_PID``
    names another process (the variables were inherited, not meant for us).
    """
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None

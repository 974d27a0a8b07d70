"""Preloaded into the embedded cluster's worker processes: they ignore SIGINT.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group, and
the worker processes the embedded cluster starts are in it. Left alone, each
would die at once with a traceback of its own, killing the groups that
``throttler serve`` is draining and burying ``throttler run``'s ``STOPPED``
lines. The parent decides what a Ctrl-C means (drain, or stop at once) and
closes the cluster itself when it exits; if the parent dies, distributed ends
its worker processes. The preload runs in the worker process's main thread at
start, restarted workers included.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

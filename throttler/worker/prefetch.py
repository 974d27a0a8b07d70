"""An iterator's items produced one step ahead, in a thread.

The aligned final task prepares the output's next row group (decoding keys,
adding partial sums: pyarrow and numpy release the GIL) while the Parquet
writer encodes the current one (which releases it too). Exceptions raised by
the producer reach the consumer; a consumer that stops early stops the
producer, and the thread is always joined before :func:`ahead` returns.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_ITEM, _DONE, _ERROR = "item", "done", "error"
POLL_SECONDS = 0.05  #: how often a blocked producer checks whether the consumer gave up


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` while a thread computes up to ``depth`` of the next ones."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_ERROR, exc))

    thread = threading.Thread(target=produce, name="throttler-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()

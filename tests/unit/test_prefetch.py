"""prefetch.ahead: order kept, errors reach the consumer, the thread never outlives the call."""

from __future__ import annotations

import threading
import time

import pytest

from throttler.worker.prefetch import ahead


def ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "throttler-ahead"]


def test_items_in_order_and_produced_ahead():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    consumed = []
    for item in ahead(items()):
        time.sleep(0.02)  # the producer runs meanwhile
        consumed.append((item, len(produced)))
    assert [i for i, _ in consumed] == [0, 1, 2, 3, 4]
    assert consumed[0][1] >= 2  # while the consumer held item 0, item 1 was already made
    assert not ahead_threads()


def test_producer_error_is_raised_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad row group")

    got = []
    with pytest.raises(ValueError, match="bad row group"):
        for item in ahead(items()):
            got.append(item)
    assert got == [1] and not ahead_threads()


def test_consumer_stopping_early_stops_the_producer():
    made = []

    def endless():
        while True:
            made.append(1)
            yield len(made)

    stream = ahead(endless(), depth=2)
    assert next(stream) == 1
    stream.close()
    assert not ahead_threads()
    count = len(made)
    time.sleep(0.2)
    assert len(made) == count and count <= 4  # nothing made after close; at most depth + 2 ahead

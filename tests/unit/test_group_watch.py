"""``serve --watch``'s pure parts: which path belongs to which group, and the debounce."""

from __future__ import annotations

import os

import pytest

from throttler.config import ConfigError, load
from throttler.spool.group_watch import Debouncer, group_of


def test_only_parquet_files_directly_in_a_group_directory_mark_the_group():
    root = os.path.join(os.sep, "data")
    assert group_of(root, os.path.join(root, "G1", "f.parquet")) == "G1"
    assert group_of(root, os.path.join(root, "G1", ".f.parquet.tmp")) is None  # a writer's temporary
    assert group_of(root, os.path.join(root, "G1", ".f.parquet")) is None
    assert group_of(root, os.path.join(root, "G1", "notes.txt")) is None
    assert group_of(root, os.path.join(root, "f.parquet")) is None  # not in a group
    assert group_of(root, os.path.join(root, "G1", "sub", "f.parquet")) is None
    assert group_of(root, os.path.join(os.sep, "elsewhere", "G1", "f.parquet")) is None
    assert group_of(root, os.path.join(root, "bad group!", "f.parquet")) is None  # not a group ID


def test_a_group_is_due_once_quiet_and_idle_and_only_once():
    d = Debouncer(quiet_seconds=2.0)
    d.note("a", 0.0)
    d.note("b", 0.5)
    d.note("a", 1.0)  # a keeps changing: its quiet time starts again
    assert d.take_due(2.6, busy=lambda g: False) == ["b"]
    assert d.take_due(2.9, busy=lambda g: False) == []
    assert d.take_due(3.0, busy=lambda g: g == "a") == []  # a is running: it waits for its run to end
    assert d.pending() == ["a"]
    assert d.take_due(9.0, busy=lambda g: False) == ["a"]
    assert d.take_due(20.0, busy=lambda g: False) == [] and d.pending() == []


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("on", True), ("false", False), ("0", False)])
def test_watch_is_a_boolean_in_the_environment(text, value):
    assert load(environ={"THROTTLER_WATCH": text}).watch is value


def test_watch_refuses_a_word_it_cannot_read():
    with pytest.raises(ConfigError, match="watch: cannot read 'maybe'"):
        load(environ={"THROTTLER_WATCH": "maybe"})

"""Byte and duration formatting and parsing (throttler.units) and the atomic writes of throttler.durable."""

import os
import stat

import pytest

from throttler import durable
from throttler.units import format_bytes, parse_bytes, parse_duration_seconds


@pytest.mark.parametrize("n_bytes, text", [
    (0, "0.0 MiB"), (2**20, "1.0 MiB"), (1536 * 2**10, "1.5 MiB"), (2**30 - 2**20, "1023.0 MiB"),
    (2**30, "1.00 GiB"), (5 * 2**29, "2.50 GiB"), (-3 * 2**30, "-3.00 GiB"),
])
def test_format_bytes(n_bytes, text):
    assert format_bytes(n_bytes) == text


@pytest.mark.parametrize("text, n_bytes", [
    ("2.5GiB", 5 * 2**29), ("16GB", 16_000_000_000), ("12.5GB", 12_500_000_000),
    ("12.5 gb", 12_500_000_000), ("700MiB", 700 * 2**20), ("1kb", 1000), ("3KiB", 3072),
    ("4096", 4096), ("4096B", 4096), (" 8 ", 8), (".5KiB", 512), (123, 123), (0, 0),
])
def test_parse_bytes(text, n_bytes):
    assert parse_bytes(text) == n_bytes


@pytest.mark.parametrize("text", ["", "GB", "-1", "1.2.3GB", "5 parsecs", "1e9", "2 GB extra", None, -5, True])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800.0), ("90s", 90.0), ("1h", 3600.0), ("45", 45.0), ("1.5h", 5400.0),
    ("2d", 172800.0), (" 10 M ", 600.0), (12, 12.0), (0.25, 0.25),
])
def test_parse_duration_seconds(text, seconds):
    assert parse_duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5s", "10 weeks", "1:30", None, -1, float("inf"), False])
def test_parse_duration_seconds_refuses(text):
    with pytest.raises(ValueError):
        parse_duration_seconds(text)


def test_replacing_writes_with_the_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    durable.write_bytes_atomic(path, b"new bytes", mode=0o640)
    assert path.read_bytes() == b"new bytes"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_replacing_keeps_the_old_file_when_the_block_raises(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with durable.replacing(path) as fh:
            fh.write(b"half")
            assert len([n for n in os.listdir(tmp_path) if n.endswith(durable.TMP_SUFFIX)]) == 1
            raise RuntimeError("mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]

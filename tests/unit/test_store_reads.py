"""Pure parts of the object store reads: range coalescing and the worker's in-flight setting."""

from __future__ import annotations

import pyarrow as pa
import pytest

from throttler import config
from throttler.worker import store_reads


def test_ranges_closer_than_the_hole_are_one_fetch_and_others_stay_apart():
    ranges = [(100, 50), (0, 100), (158, 10), (10_000, 5)]  # adjacent, then an 8-byte hole, then far
    assert store_reads.coalesce(ranges, hole_bytes=8) == [(0, 168), (10_000, 5)]
    assert store_reads.coalesce(ranges, hole_bytes=7) == [(0, 150), (158, 10), (10_000, 5)]
    assert store_reads.coalesce([(0, 100), (20, 10)], hole_bytes=0) == [(0, 100)]  # contained


def test_the_seed_files_key_ranges_coalesce_per_row_group():
    # a seed file's first two row groups: path, Date adjacent; the value chunk (8.7 MB) between row groups
    ranges = [(4, 74520), (74524, 54841), (8793659, 74567), (8868226, 54841)]
    assert store_reads.coalesce(ranges) == [(4, 129361), (8793659, 129408)]


def test_reads_in_flight_comes_from_the_workers_environment_else_the_default(monkeypatch):
    monkeypatch.delenv("THROTTLER_OBJECT_STORE_READS_IN_FLIGHT", raising=False)
    assert store_reads.reads_in_flight() == config.DEFAULTS.object_store_reads_in_flight == 8
    monkeypatch.setenv("THROTTLER_OBJECT_STORE_READS_IN_FLIGHT", "3")
    assert store_reads.reads_in_flight() == 3
    monkeypatch.setenv("THROTTLER_OBJECT_STORE_READS_IN_FLIGHT", "0")
    with pytest.raises(config.ConfigError, match="object_store_reads_in_flight must be >= 1"):
        store_reads.reads_in_flight()


def test_key_bytes_are_read_only_when_the_footer_layout_could_match(tmp_path):
    from tests.helpers.datafiles import write_sim
    from throttler.worker import contract, kernels

    ref = kernels._Reference(write_sim(tmp_path / "ref.parquet", 40, 20, seed=0, row_group_size=100))
    reads: list[int] = []

    def same(path):
        pf = contract.open_parquet(path)

        def read_ranges(ranges):
            reads.append(len(ranges))
            return contract._read_in_turn(path, ranges)
        return ref.same_key_bytes(pf, path, contract.check_schema(pf, path), read_ranges)

    assert same(write_sim(tmp_path / "aligned.parquet", 40, 20, seed=1, row_group_size=100)) is True
    assert reads == [16]  # 8 row groups x (path, Date)
    assert same(write_sim(tmp_path / "shuffled.parquet", 40, 20, seed=2, shuffle=True, row_group_size=100)) is False
    assert same(write_sim(tmp_path / "wider.parquet", 40, 20, seed=3, row_group_size=100,
                          path_type=pa.int32())) is False
    assert reads == [16]  # the layouts differ (chunk sizes, types): no key bytes read

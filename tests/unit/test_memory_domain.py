"""Workers sharing one machine's memory: the limits they are sized from (pure, milliseconds)."""

from __future__ import annotations

import os

from throttler.cluster import memory_domain as md

GB = 10**9


def _members(*limits, memory=24 * GB):
    return [md.Member(f"tcp://10.0.0.1:{4000 + i}", limit, memory) for i, limit in enumerate(limits)]


def _limits(*limits, memory=24 * GB):
    return list(md.domain_limits(_members(*limits, memory=memory)).values())


def test_limits_that_fit_the_machine_are_kept():
    assert _limits(8 * GB, 8 * GB) == [8 * GB, 8 * GB]
    assert _limits(12 * GB, 12 * GB) == [12 * GB, 12 * GB]  # exactly the machine: kept
    assert _limits(16 * GB, 2 * GB) == [16 * GB, 2 * GB]  # uneven, by the operator's choice


def test_two_workers_each_given_the_whole_host_share_it():
    # `dask worker --nworkers 2 --nthreads 2` on a 2-core host: each worker's auto limit is the host
    assert _limits(24 * GB, 24 * GB) == [12 * GB, 12 * GB]


def test_overcommitted_limits_are_scaled_down_in_proportion():
    assert _limits(20 * GB, 10 * GB) == [16 * GB, 8 * GB]
    assert sum(_limits(7, 11, 13, memory=17)) <= 17  # integer shares never sum past the machine


def test_workers_without_a_limit_get_what_the_limited_ones_leave():
    assert _limits(2 * GB, 2 * GB, 0) == [2 * GB, 2 * GB, 20 * GB]
    assert _limits(4 * GB, 0, 0) == [4 * GB, 10 * GB, 10 * GB]
    assert _limits(0, 0) == [12 * GB, 12 * GB]  # as many even shares as workers


def test_a_worker_without_a_limit_gets_at_least_an_even_share_then_all_are_scaled():
    # the limited ones already take the machine: 8 GB (24 / 3) for it, then 56 GB scaled to 24
    scaled = [limit * (24 * GB) // (56 * GB) for limit in (24 * GB, 24 * GB, 8 * GB)]
    assert _limits(24 * GB, 24 * GB, 0) == scaled == [10_285_714_285, 10_285_714_285, 3_428_571_428]


def test_the_smallest_memory_any_member_saw_is_the_domain_s():
    members = [md.Member("a", 10 * GB, 24 * GB), md.Member("b", 10 * GB, 16 * GB)]
    assert md.domain_limits(members) == {"a": 8 * GB, "b": 8 * GB}


def test_dead_workers_entries_are_left_out():
    entries = {"tcp://a:1": {"own_limit_bytes": 24 * GB, "domain_memory_bytes": 24 * GB},
               "tcp://b:2": {"own_limit_bytes": 24 * GB, "domain_memory_bytes": 24 * GB}}
    members = md.members_from_metadata(entries, live={"tcp://b:2"})
    assert members == [md.Member("tcp://b:2", 24 * GB, 24 * GB)]
    assert md.domain_limits(members) == {"tcp://b:2": 24 * GB}
    assert md.domain_limits([]) == {}


def test_the_domain_is_this_kernel_and_cgroup_namespace():  # Linux, as the daemon (systemd, cgroups)
    with open("/proc/sys/kernel/random/boot_id") as fh:
        boot_id = fh.read().strip()
    assert md.domain_id() == f"{boot_id}/{os.readlink('/proc/self/ns/cgroup')}"


def test_throttler_status_names_each_capped_worker():
    from throttler.commands.status import status_lines

    daemon = {"pid": 7, "updated_unix_seconds": 50.0, "states": {"running": 0}, "workers": {"running": 2},
              "cluster_memory": {"limit_bytes": 12 * GB, "used_bytes": 0, "free_bytes": 12 * GB, "reserved_bytes": 0},
              "running": [], "workers_host_capped": {
                  "tcp://10.0.0.1:4001": {"memory_limit_bytes": 2**35, "sized_limit_bytes": 2**34}}}
    doc = {"running": True, "not_running_reason": None, "daemon": daemon,
           "queue": {"incoming": 0, "active": 0, "done": 0, "failed": 0}}
    assert "  worker tcp://10.0.0.1:4001: memory_limit 32.00 GiB overcommits its machine with the others there:" \
           " sized to its share, 16.00 GiB" in status_lines(doc, 60.0)

"""Admission policy: pure, in milliseconds, with fake snapshots."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttler.admission.ledger import Ledger, Reservation
from throttler.admission.policy import (
    AdmissionPolicy,
    Budget,
    QueueEntry,
    Tally,
    choose,
    decide,
    queue_order,
)
from throttler.cluster.snapshot import (
    NUMBA_RESIDENT_BYTES,
    WORKER_BASELINE_BYTES,
    ClusterSnapshot,
    WorkerView,
)
from throttler.planning.plan import Plan

GiB = 2**30
MiB = 2**20


def worker(name="w1", limit=10 * GiB, process=0, old=None, managed=0, status="running", nthreads=2,
           processing=1, code=0):
    return WorkerView(name=name, address=f"tcp://{name}:1", status=status, nthreads=nthreads,
                      memory_limit_bytes=limit, process_bytes=process, managed_bytes=managed,
                      unmanaged_old_bytes=process if old is None else old,
                      processing=processing, resident_code_bytes=code)


def snap(*workers):
    return ClusterSnapshot(workers=tuple(workers), taken_at_seconds=0.0)


def plan(group="g", group_peak=1 * GiB, task_peak=None):
    return Plan(group=group, strategy="aligned", files=(), files_per_task=1, fan_in=8,
                task_peak_bytes=group_peak if task_peak is None else task_peak,
                group_peak_bytes=group_peak, expansion=1.0)


def reservation(key="r", peak=1 * GiB):
    return Reservation(group=key, key=key, group_peak_bytes=peak, task_peak_bytes=peak,
                       submitted_at_seconds=0.0)


def entry(group, peak, priority=0, at=0.0, task_peak=None):
    return QueueEntry(plan(group, peak, task_peak), priority=priority, enqueued_at_seconds=at)


# two 10 GiB workers at fraction 0.6: capacity 12 GiB
TWO = snap(worker("w1"), worker("w2"))


# --------------------------------------------------------------------------- decide


def test_admits_what_fits_and_reports_figures():
    d = decide(TWO, [], plan(group_peak=5 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.admit and not d.fatal
    assert d.free_bytes == 12 * GiB
    assert d.needed_bytes == 5 * GiB
    assert "fits" in d.reason


def test_workers_sized_to_their_share_of_an_overcommitted_host_count_that_share():
    # two workers each given the whole 20 GiB host by Dask, sized by the plugin to 10 GiB each
    capped = [WorkerView(**{**worker(name, limit=20 * GiB).__dict__, "sized_limit_bytes": 10 * GiB})
              for name in ("w1", "w2")]
    d = decide(snap(*capped), [], plan(group_peak=5 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.free_bytes == 12 * GiB  # 0.6 x 2 x 10 GiB, not 0.6 x 2 x 20 GiB
    unlimited = WorkerView(**{**worker("w3", limit=0).__dict__, "sized_limit_bytes": 10 * GiB})
    assert unlimited.budget_limit_bytes == 0  # as before any sizing: no limit, no admission capacity
    larger = WorkerView(**{**worker("w4", limit=8 * GiB).__dict__, "sized_limit_bytes": 10 * GiB})
    assert larger.budget_limit_bytes == 8 * GiB  # never above Dask's own limit


def test_lag_reservations_stand_in_for_memory_not_yet_visible():
    # Two groups of 5 GiB were just submitted: heartbeats still show empty workers.
    reserved = [reservation("a", 5 * GiB), reservation("b", 5 * GiB)]
    d = decide(TWO, reserved, plan(group_peak=3 * GiB, task_peak=1 * GiB), now_seconds=1)
    assert not d.admit
    assert d.free_bytes == 2 * GiB
    assert "waits for memory" in d.reason


def test_no_double_counting_once_memory_shows_up():
    # The reserved 5 GiB group now shows in process memory (managed), above a 1 GiB baseline.
    shown = snap(worker("w1", process=3 * GiB + GiB // 2, old=GiB // 2, managed=3 * GiB),
                 worker("w2", process=2 * GiB + GiB // 2, old=GiB // 2, managed=2 * GiB))
    d = decide(shown, [reservation("a", 5 * GiB)], plan(group_peak=6 * GiB, task_peak=1 * GiB),
               now_seconds=5)
    assert d.free_bytes == 12 * GiB - 6 * GiB  # used = max(6, 1 + 5), not 6 + 5
    assert d.admit


def test_idle_workers_kept_allocator_pages_are_reusable():
    # Both workers idle at 3 GiB RSS after earlier tasks (allocator pages), 1 GiB of it managed data.
    idle = snap(worker("w1", process=3 * GiB, managed=GiB, processing=0),
                worker("w2", process=3 * GiB, managed=GiB, processing=0))
    baseline = WORKER_BASELINE_BYTES
    d = decide(idle, [], plan(group_peak=8 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.free_bytes == 12 * GiB - 2 * (GiB + baseline) and d.admit and "fits" in d.reason
    # The same figures on busy workers count in full.
    busy = snap(worker("w1", process=3 * GiB, managed=GiB), worker("w2", process=3 * GiB, managed=GiB))
    assert decide(busy, [], plan(group_peak=8 * GiB, task_peak=1 * GiB), now_seconds=0).free_bytes == 6 * GiB


def test_idle_workers_code_loaded_past_the_baseline_counts_as_their_own():
    # One idle worker reports numba loaded (a dense task ran there); the other does not.
    code = NUMBA_RESIDENT_BYTES
    idle = snap(worker("w1", process=3 * GiB, managed=GiB, processing=0, code=code),
                worker("w2", process=3 * GiB, managed=GiB, processing=0))
    d = decide(idle, [], plan(group_peak=8 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.free_bytes == 12 * GiB - 2 * (GiB + WORKER_BASELINE_BYTES) - code
    # Reservations add to it: a worker's own memory includes its code.
    d = decide(idle, [reservation("a", 2 * GiB)], plan(group_peak=1 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.free_bytes == 12 * GiB - max(2 * (GiB + WORKER_BASELINE_BYTES) + code,
                                          2 * WORKER_BASELINE_BYTES + code + 2 * GiB)
    # Never more than the process holds: a worker just started shows less than baseline + code.
    small = snap(worker("w1", process=200 * MiB, processing=0, code=code))
    assert decide(small, [], plan(group_peak=1 * GiB, task_peak=1 * GiB), now_seconds=0).free_bytes \
        == 6 * GiB - 200 * MiB


def test_process_memory_counts_when_larger_than_reservations():
    busy = snap(worker("w1", process=6 * GiB, old=1 * GiB), worker("w2", process=4 * GiB, old=1 * GiB))
    d = decide(busy, [reservation("a", 1 * GiB)], plan(group_peak=3 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.free_bytes == 2 * GiB
    assert not d.admit


@pytest.mark.parametrize("status", ["paused", "closing", "closed", "closing_gracefully"])
def test_non_running_workers_bring_no_capacity(status):
    s = snap(worker("w1"), worker("w2", status=status))
    d = decide(s, [], plan(group_peak=5 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert d.admit and d.free_bytes == 6 * GiB
    d = decide(s, [], plan(group_peak=7 * GiB, task_peak=1 * GiB), now_seconds=0)
    # 7 GiB exceeds the running capacity (6 GiB): admitted only because nothing else is reserved
    assert d.admit and "alone" in d.reason
    d = decide(s, [reservation()], plan(group_peak=7 * GiB, task_peak=1 * GiB), now_seconds=0)
    assert not d.admit


def test_paused_workers_memory_is_not_counted_as_used():
    s = snap(worker("w1"), worker("w2", status="paused", process=9 * GiB))
    assert decide(s, [], plan(group_peak=5 * GiB), now_seconds=0).free_bytes == 6 * GiB


def test_nothing_running_waits():
    s = snap(worker("w1", status="paused"), worker("w2", status="closing"))
    d = decide(s, [], plan(group_peak=1 * GiB), now_seconds=0)
    assert not d.admit and not d.fatal
    assert d.reason == "no running workers"
    d = decide(snap(), [], plan(group_peak=1 * GiB), now_seconds=0)
    assert d.reason == "no running workers" and not d.fatal


def test_a_task_larger_than_any_worker_is_fatal():
    # a 10 GiB worker lets one task alone reach 0.75 x 10 GiB less its own baseline: 7.36 GiB
    d = decide(TWO, [], plan(group_peak=8 * GiB, task_peak=int(7.5 * GiB)), now_seconds=0)
    assert not d.admit and d.fatal
    assert d.reason == ("does not fit: the largest task needs 7.50 GiB but the largest worker allows 7.36 GiB "
                        "for one task running alone (below Dask's pause threshold)")
    assert decide(TWO, [], plan(group_peak=8 * GiB, task_peak=7 * GiB), now_seconds=0).admit  # alone, it fits


def test_a_task_fitting_only_a_paused_worker_waits_without_being_fatal():
    s = snap(worker("small", limit=2 * GiB), worker("big", limit=20 * GiB, status="paused"))
    d = decide(s, [], plan(group_peak=8 * GiB, task_peak=8 * GiB), now_seconds=0)
    assert not d.admit and not d.fatal
    assert "fits no running worker" in d.reason


def test_lone_big_group_runs_on_an_empty_cluster():
    d = decide(TWO, [], plan(group_peak=30 * GiB, task_peak=2 * GiB), now_seconds=0)
    assert d.admit and "alone" in d.reason
    d = decide(TWO, [reservation(peak=1)], plan(group_peak=30 * GiB, task_peak=2 * GiB), now_seconds=0)
    assert not d.admit and not d.fatal


def test_a_group_that_never_fits_the_free_memory_runs_alone_instead_of_waiting_forever():
    # The workers' own memory (4 GiB each, not ours) leaves 4 GiB free: a 10 GiB group
    # fits the capacity (12 GiB) but never the free memory.
    baseline = snap(worker("w1", process=4 * GiB), worker("w2", process=4 * GiB))
    candidate = plan(group_peak=10 * GiB, task_peak=1 * GiB)
    d = decide(baseline, [reservation()], candidate, now_seconds=0)
    assert not d.admit and "waits for memory" in d.reason
    d = decide(baseline, [], candidate, now_seconds=0)
    assert d.admit and "runs alone" in d.reason and d.free_bytes == 4 * GiB


def test_backfill_closes_after_the_head_waited_long_enough():
    small = plan("small", 1 * GiB)
    d = decide(TWO, [], small, now_seconds=59, is_head=False, head_waiting_since_seconds=0,
               max_backfill_delay_seconds=60)
    assert d.admit
    d = decide(TWO, [], small, now_seconds=60, is_head=False, head_waiting_since_seconds=0,
               max_backfill_delay_seconds=60)
    assert not d.admit and "backfill closed" in d.reason


# --------------------------------------------------------------------------- choose


def test_choose_admits_in_priority_then_arrival_order_without_over_admitting():
    queue = [entry("late", 5 * GiB, at=3), entry("urgent", 5 * GiB, priority=5, at=9),
             entry("early", 5 * GiB, at=1)]
    assert [e.plan.group for e in queue_order(queue)] == ["urgent", "early", "late"]
    choices = choose(TWO, [], queue, now_seconds=10)
    assert [c.plan.group for c in choices] == ["urgent", "early"]  # 12 GiB: two of three
    assert all(c.decision.admit for c in choices)


def test_smaller_groups_backfill_while_the_head_is_young():
    reserved = [reservation("running", 8 * GiB)]
    queue = [entry("big", 6 * GiB, at=100), entry("small", 2 * GiB, at=101)]
    choices = choose(TWO, reserved, queue, now_seconds=130, policy=AdmissionPolicy(max_head_wait_seconds=60))
    assert [c.plan.group for c in choices] == ["small"]


def test_an_old_head_blocks_backfill_so_it_starts_within_a_bound():
    reserved = [reservation("running", 8 * GiB)]
    queue = [entry("big", 6 * GiB, at=100), entry("small", 2 * GiB, at=101)]
    policy = AdmissionPolicy(max_head_wait_seconds=60)
    assert choose(TWO, reserved, queue, now_seconds=160, policy=policy) == []
    # once the running group is released, the big head starts first
    choices = choose(TWO, [], queue, now_seconds=170, policy=policy)
    assert [c.plan.group for c in choices] == ["big", "small"]


def test_a_fatal_head_is_returned_and_blocks_nobody():
    queue = [entry("huge-task", 8 * GiB, at=0, task_peak=int(7.5 * GiB)), entry("small", 1 * GiB, at=1)]
    choices = choose(TWO, [], queue, now_seconds=1000)
    assert [(c.plan.group, c.decision.admit, c.decision.fatal) for c in choices] == [
        ("huge-task", False, True), ("small", True, False)]


def test_a_lone_big_group_is_admitted_once_then_others_wait():
    queue = [entry("giant", 30 * GiB, at=0, task_peak=2 * GiB), entry("small", 1 * GiB, at=1)]
    choices = choose(TWO, [], queue, now_seconds=1)
    assert [c.plan.group for c in choices] == ["giant"]  # the virtual ledger now holds 30 GiB


def test_reservation_keys_come_from_entries():
    e = QueueEntry(plan("g"), key="tok-1")
    assert e.reservation_key == "tok-1"
    assert QueueEntry(plan("g")).reservation_key == "g"


# --------------------------------------------------------------------------- ledger


def test_ledger_reserve_release_total():
    ledger = Ledger()
    ledger.reserve(reservation("a", 3))
    ledger.reserve(Reservation("b", "b", 4, 1, submitted_at_seconds=-1.0))
    assert ledger.total_bytes() == 7 and len(ledger) == 2
    assert [r.key for r in ledger.items()] == ["b", "a"]
    with pytest.raises(KeyError):
        ledger.reserve(reservation("a", 3))
    assert ledger.release("a").group_peak_bytes == 3
    assert ledger.release("a") is None
    assert ledger.total_bytes() == 4


def test_ledger_is_thread_safe():
    ledger = Ledger()

    def work(t):
        for i in range(500):
            ledger.reserve(reservation(f"{t}-{i}", 1))
            if i % 2:
                ledger.release(f"{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.total_bytes() == 8 * 250


# --------------------------------------------------------------------------- property


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(st.integers(1 * GiB, 16 * GiB), min_size=1, max_size=4),
    baseline_share=st.floats(0.0, 0.5),
    peaks=st.lists(st.integers(1 * MiB, 8 * GiB), min_size=1, max_size=30),
    rounds=st.integers(1, 5),
)
def test_admitted_memory_plus_baseline_never_exceeds_capacity(limits, baseline_share, peaks, rounds):
    """Memory never shows up in heartbeats (worst lag): the ledger alone must hold the line."""
    workers = [worker(f"w{i}", limit=lim, process=int(lim * 0.6 * baseline_share))
               for i, lim in enumerate(limits)]
    s = snap(*workers)
    capacity = sum(int(w.memory_limit_bytes * 0.6) for w in workers)
    baseline = sum(w.process_bytes for w in workers)
    ledger = Ledger()
    queue = [entry(f"g{i}", p, at=i, task_peak=min(p, 512 * MiB)) for i, p in enumerate(peaks)]
    ran_alone = []  # groups admitted by the never-deadlock rule: nothing of ours was reserved
    for r in range(rounds):  # several rounds, each seeing the ledger of the previous ones
        for c in choose(s, ledger.items(), queue, now_seconds=float(r)):
            if c.decision.admit:
                if c.decision.reason.startswith("runs alone"):
                    assert not ledger.items(), c.decision.reason
                    ran_alone.append(c.plan.group)
                ledger.reserve(Reservation(c.plan.group, c.entry.reservation_key,
                                           c.plan.group_peak_bytes, c.plan.task_peak_bytes, float(r)))
        queue = [e for e in queue if e.reservation_key not in {x.key for x in ledger.items()}]
    admitted = [x.group for x in ledger.items()]
    if ran_alone:  # a group that ran alone keeps the cluster to itself: nothing joins it
        assert admitted == ran_alone and len(ran_alone) == 1
    else:
        assert baseline + ledger.total_bytes() <= capacity


def split_plan(group, running, waiting, task_peak):
    return Plan(group=group, strategy="sum", files=(), files_per_task=1, fan_in=8, task_peak_bytes=task_peak,
                group_peak_bytes=running + waiting, expansion=1.0, running_bytes=running)


def test_running_parts_are_capped_by_the_threads_of_the_cluster():
    # two workers x 2 threads: at most 4 tasks of 1 GiB run at once, whatever the groups reserve
    reserved = [Reservation(f"r{i}", f"r{i}", 4 * GiB + GiB // 2, GiB, 0.0, running_bytes=4 * GiB)
                for i in range(2)]  # each: 4 GiB running + 0.5 GiB waiting results
    d = decide(TWO, reserved, split_plan("c", 4 * GiB, GiB // 2, GiB), now_seconds=0)
    # reserved counts min(8, 4 x 1) + 1 GiB = 5 GiB; the candidate adds only its waiting 0.5 GiB
    assert d.admit and d.free_bytes == 12 * GiB - 5 * GiB and "needs 512.0 MiB more" in d.reason
    # unsplit reservations (running_bytes=0) are counted whole, as before
    whole = [Reservation(f"r{i}", f"r{i}", 4 * GiB + GiB // 2, GiB, 0.0) for i in range(2)]
    assert decide(TWO, whole, split_plan("c", 4 * GiB, GiB // 2, GiB), now_seconds=0).free_bytes == 3 * GiB


def test_a_bigger_task_raises_the_running_cap():
    reserved = [Reservation("r", "r", 4 * GiB, GiB, 0.0, running_bytes=4 * GiB)]
    d = decide(TWO, reserved, split_plan("c", 8 * GiB, 0, 2 * GiB), now_seconds=0)
    # 4 threads x 2 GiB = 8 GiB of running tasks at most: the increment is 8 - 4 = 4 GiB
    assert d.admit and "needs 4.00 GiB more" in d.reason


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**11)), max_size=30),
       st.integers(0, 64))
def test_tally_of_is_plus_folded(rows, threads):
    """The one-loop Tally.of equals adding the reservations one by one with plus."""
    reserved = [Reservation(f"g{i}", f"k{i}", group, task, float(i), running)
                for i, (group, running, task) in enumerate(rows)]
    folded = Tally()
    for r in reserved:
        folded = folded.plus(r.group_peak_bytes, r.running_bytes, r.task_peak_bytes)
    assert Tally.of(reserved) == folded
    assert Tally.of(reserved).total_bytes(threads) == folded.total_bytes(threads)


def test_a_withheld_worker_is_left_out_of_capacity_and_the_planning_shape():
    both = snap(worker("w1", limit=10 * GiB), worker("w2", limit=4 * GiB))
    usable = both.without(["tcp://w2:1", "tcp://gone:1"])
    assert [w.name for w in usable.running_workers] == ["w1"]
    assert Budget.of(usable, 0.6).capacity_bytes == int(0.6 * 10 * GiB)
    assert usable.shape().memory_limit_bytes == (10 * GiB,)
    assert both.without(["tcp://gone:1"]) is both


def test_a_group_that_fits_only_a_withheld_worker_waits_for_it_rather_than_fail():
    """The big worker is withheld (its first check is running, or it cannot see the output): a group
    whose task only it could hold is not admitted, and not failed as one that can never fit."""
    cluster = snap(worker("small", limit=2 * GiB), worker("big", limit=20 * GiB)).without(["tcp://big:1"])
    verdict = decide(cluster, [], plan("g", group_peak=6 * GiB), now_seconds=0.0)
    assert not verdict.admit and not verdict.fatal
    alone = snap(worker("small", limit=2 * GiB))
    assert decide(alone, [], plan("g", group_peak=6 * GiB), now_seconds=0.0).fatal

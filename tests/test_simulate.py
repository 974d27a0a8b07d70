"""The estate simulation: the real planner and admission on a modelled cluster (small estates, fast)."""

from dataclasses import replace

import pytest

from throttler.planning.estimator import Estimator
from throttler.simulate import (
    GIB,
    POLICIES,
    Calibration,
    ModelCluster,
    Scenario,
    Simulation,
    cached_plan,
    lower_bounds,
    plan_peaks,
    seed_estate,
    simulate,
    tree_shape,
)
from throttler.worker import graphs

#: About 650 files in 59 groups of 2 to 150 files.
SIZES = seed_estate(600, seed=3, max_files=150)

#: Tight memory: 2 GiB workers with 4 threads; every task of the estate fits one worker.
TIGHT = ModelCluster(4, 2 * GIB, 4)


def run(policy: str, cluster: ModelCluster = TIGHT, sizes=SIZES, **scenario):
    sim = Simulation(sizes, cluster, Scenario(policy, **scenario))
    return sim, sim.run()


def test_the_estate_is_long_tailed_and_sized_as_asked():
    sizes = seed_estate(140_000)
    assert 140_000 <= sum(sizes) < 140_000 + 18_000
    assert min(sizes) == 2 and max(sizes) == 18_000
    assert sum(1 for n in sizes if n <= 10) > len(sizes) / 2


def test_throttler_stays_within_capacity_and_kills_no_worker():
    sim, r = run("throttler")
    capacity = TIGHT.capacity_bytes(0.6)
    assert all(g.plan.group_peak_bytes <= capacity for g in sim.groups)  # no group runs alone here
    assert r.kills == 0
    assert r.peak_reserved_bytes <= r.capacity_bytes
    assert r.peak_held_bytes <= r.capacity_bytes
    assert r.peak_worker_fraction < TIGHT.kill_fraction
    assert (r.completed, r.failed, r.stuck) == (len(SIZES), 0, 0)


#: As TIGHT, with 6 threads a worker: more tasks share each worker's memory.
CROWDED = ModelCluster(4, 2 * GIB, 6)


def test_all_at_once_kills_workers_on_an_estate_far_bigger_than_memory():
    bounds = lower_bounds(SIZES, TIGHT, Scenario("all-at-once"))
    assert bounds.memory_bound_seconds > 0
    _, r = run("all-at-once")
    assert r.kills > 0 and r.peak_worker_fraction > TIGHT.kill_fraction
    assert r.completed + r.failed == len(SIZES) and r.stuck == 0
    _, crowded = run("all-at-once", CROWDED)
    assert crowded.failed > 0  # some task died on more than allowed_failures workers: KilledWorker
    _, throttled = run("throttler", CROWDED)
    assert (throttled.kills, throttled.failed, throttled.completed) == (0, 0, len(SIZES))


def test_every_group_finishes_exactly_once_under_throttler():
    sim = Simulation(SIZES, TIGHT, Scenario("throttler"))
    ends: dict[str, int] = {}
    ended = sim._group_ended

    def counting(g, ok, error=""):
        ends[g.name] = ends.get(g.name, 0) + 1
        ended(g, ok, error)

    sim._group_ended = counting
    r = sim.run()
    assert ends == {g.name: 1 for g in sim.groups}
    assert all(g.ok and g.attempts == 1 for g in sim.groups)
    expected_tasks = sum(graphs.build(g.plan, "/nonexistent/out.parquet").n_tasks for g in sim.groups)
    assert r.tasks_run == expected_tasks  # the real graphs' tasks, none twice: nothing was lost


@pytest.mark.parametrize("policy", POLICIES)
def test_no_run_beats_the_lower_bound(policy):
    cluster = ModelCluster(4, 16 * GIB, 4)
    _, r = run(policy, cluster)
    bounds = lower_bounds(SIZES, cluster, Scenario(policy))
    assert r.failed == 0
    assert r.makespan_seconds >= bounds.lower_bound_seconds * 0.999
    assert 0 < r.utilisation <= 1


def test_the_simulation_is_deterministic_for_a_seed():
    scenario = Scenario("throttler", peak_noise=(0.9, 1.4), seed=7)
    first, second = (replace(simulate(SIZES, TIGHT, scenario), wall_seconds=0) for _ in range(2))
    assert first == second
    other = replace(simulate(SIZES, TIGHT, replace(scenario, seed=8)), wall_seconds=0)
    assert other != first


@pytest.mark.parametrize("head_wait", [5.0, 60.0])
def test_the_big_group_starts_within_the_head_wait_bound(head_wait):
    """Small groups backfill past a big one until it has waited max_head_wait; then nothing new
    starts, so it starts at most max_head_wait + the drain of what was running after it arrived."""
    sizes = [3] * 30 + [4000] + [3] * 300
    cluster = ModelCluster(8, 2 * GIB, 4)
    sim, r = run("throttler", cluster, sizes, max_head_wait_seconds=head_wait)
    big = max(sim.groups, key=lambda g: g.n_files)
    assert big.plan.group_peak_bytes > cluster.capacity_bytes(0.6) / 2  # it cannot start beside much
    before = [g for g in sim.groups if g is not big and g.launched_at < big.launched_at]
    drain = max(g.ended_at - g.launched_at for g in before)
    wait = big.launched_at - big.enqueued_at
    assert 0 < wait <= head_wait + drain + Scenario("throttler").admission_interval_seconds
    assert any(sim.groups.index(g) > sim.groups.index(big) for g in before)  # small ones backfilled
    assert (r.completed, r.kills) == (len(sizes), 0)


@pytest.mark.parametrize("strategy", ["aligned", "sum", "groupby"])
@pytest.mark.parametrize("n_files", [2, 9, 300, 5000])
def test_task_peaks_are_the_plans_own(strategy, n_files):
    """The simulated tasks use the planner's prices: a drift in either would show here."""
    cluster = ModelCluster(16, 32 * GIB, 8)
    estimator = Estimator()
    plan = cached_plan("g", n_files, cluster.shape(), estimator, Scenario("throttler", strategy=strategy),
                       Calibration())
    estimate, truth = plan_peaks(plan, estimator)
    assert estimate.peak_bytes == plan.task_peak_bytes
    assert truth.peak_bytes <= estimate.peak_bytes
    leaves, levels, final_inputs = tree_shape(plan)
    assert sum(leaves) == n_files and len(leaves) == plan.n_leaf_tasks
    assert final_inputs <= max(2, plan.fan_in)


def test_a_kill_is_survived_by_recomputing_lost_work():
    """Under resources only, with MEMORY declared as the whole limit, 2 GiB workers die (MEMORY
    guards tasks, not held results); the groups whose tasks did not die too often still finish,
    with their lost partials recomputed."""
    sim, r = run("resources", replace(TIGHT, memory_resource_bytes=TIGHT.memory_limit_bytes))
    assert r.kills > 0 and r.lost_thread_seconds > 0
    assert r.completed > 0 and r.stuck == 0
    done_tasks = sum(len(g.run.tasks) for g in sim.groups if g.ok)
    assert r.tasks_run > done_tasks

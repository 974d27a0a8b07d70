"""The estate simulation: the real planner and admission on a modelled cluster and storage (small, fast)."""

import argparse
import subprocess
import sys
import json
from dataclasses import replace

import pytest

from throttler.planning.estimator import Estimator
from throttler.simulation import arguments
from throttler.simulation.bounds import lower_bounds
from throttler.simulation.calibration import GIB, Calibration
from throttler.simulation.deadline import smallest_cluster
from throttler.simulation.engine import Simulation, simulate
from throttler.simulation.estate import case_study, seed_sizes, uniform_estate
from throttler.simulation.model import (
    POLICIES,
    ModelCluster,
    Scenario,
    Storage,
    parse_bytes,
    parse_duration,
    parse_rate,
)
from throttler.simulation.plans import PlanCache, plan_peaks, tree_shape
from throttler.worker import graphs

#: About 650 files of 140 MB in 59 groups of 2 to 150 files.
ESTATE = uniform_estate(seed_sizes(600, seed=3, max_files=150))
TIGHT = ModelCluster(4, 2 * GIB, 4)  #: 2 GiB workers with 4 threads; every task fits one worker
ROOMY = ModelCluster(4, 16 * GIB, 4)


def run(policy, cluster=TIGHT, estate=ESTATE, **scenario):
    sim = Simulation(estate, cluster, Scenario(policy, **scenario))
    return sim, sim.run()


def test_units_parse():
    assert parse_bytes("2.5GiB") == int(2.5 * 2**30) and parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("1234") == 1234
    assert parse_rate("12.5GB/s") == 12.5e9 and parse_rate("10Gbit/s") == 1.25e9
    assert parse_duration("30m") == 1800 and parse_duration("5ms") == 0.005


def test_the_case_study_is_long_tailed_and_sized_as_asked():
    estate = case_study()
    assert 140_000 <= estate.files < 140_000 + 18_000
    assert min(estate.sizes) == 2 and max(estate.sizes) == 18_000
    assert estate.input_bytes == estate.files * 140_000_000


STORAGES = [Storage(2e9, 1e9, 0.0), Storage(20e9, 0.3e9, 0.002), Storage(50e9, 50e9, 0.0), Storage()]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("policy", POLICIES)
def test_no_run_beats_physics(policy, storage):
    cluster = replace(ROOMY, storage=storage)
    _, r = run(policy, cluster)
    b = lower_bounds(ESTATE, cluster, Scenario(policy))
    assert (r.failed, r.stuck) == (0, 0)
    assert r.bytes_read == ESTATE.input_bytes
    tol = 1 - 1e-9
    assert r.makespan_seconds >= b.storage_bound_seconds * tol
    assert r.makespan_seconds >= r.busiest_node_bytes / storage.node_bytes_per_second * tol
    assert r.makespan_seconds >= b.node_link_bound_seconds * tol
    assert r.makespan_seconds >= b.work_bound_seconds * tol
    assert r.makespan_seconds >= b.daemon_bound_seconds * tol
    assert r.makespan_seconds >= b.scheduler_bound_seconds * tol
    assert r.makespan_seconds >= b.lower_bound_seconds * tol
    assert 0 < r.utilisation <= 1


def test_a_storage_starved_run_is_storage_bound():
    cluster = replace(ROOMY, storage=Storage(1e9, 10e9))
    _, r = run("throttler", cluster)
    b = lower_bounds(ESTATE, cluster, Scenario("throttler"))
    assert b.binding == "storage bandwidth"
    assert b.storage_bound_seconds == ESTATE.input_bytes / 1e9
    assert r.makespan_seconds <= b.storage_bound_seconds * 1.1  # the reads kept the storage busy
    fast = replace(ROOMY, storage=Storage(1e12, 1e12))
    assert lower_bounds(ESTATE, fast, Scenario("throttler")).binding == "worker threads"


def test_throttler_stays_within_capacity_and_kills_no_worker():
    sim, r = run("throttler")
    assert r.kills == 0
    assert r.peak_reserved_bytes <= r.capacity_bytes
    assert r.peak_held_bytes <= r.capacity_bytes
    assert r.peak_worker_fraction < TIGHT.kill_fraction
    assert (r.completed, r.failed, r.stuck) == (len(ESTATE.groups), 0, 0)


def test_all_at_once_kills_workers_where_the_throttler_does_not():
    crowded = ModelCluster(4, 2 * GIB, 6)
    _, r = run("all-at-once", crowded)
    assert r.kills > 0 and r.peak_worker_fraction > crowded.kill_fraction
    _, throttled = run("throttler", crowded)
    assert (throttled.kills, throttled.failed, throttled.completed) == (0, 0, len(ESTATE.groups))


def test_every_group_finishes_once_and_runs_the_real_graphs_tasks():
    sim, r = run("throttler", replace(TIGHT, storage=Storage(5e9, 1e9, 0.001)))
    assert all(g.ok and g.attempts == 1 for g in sim.groups)
    expected_tasks = sum(graphs.build(g.plan, "/nonexistent/out.parquet").n_tasks for g in sim.groups)
    assert r.tasks_run == expected_tasks


def test_the_simulation_is_deterministic_for_a_seed():
    scenario = Scenario("throttler", peak_noise=(0.9, 1.4), seed=7)
    first, second = (replace(simulate(ESTATE, TIGHT, scenario), wall_seconds=0) for _ in range(2))
    assert first == second
    assert replace(simulate(ESTATE, TIGHT, replace(scenario, seed=8)), wall_seconds=0) != first


@pytest.mark.parametrize("strategy", ["aligned", "sum", "groupby"])
@pytest.mark.parametrize("n_files", [2, 9, 300, 5000])
def test_task_peaks_are_the_plans_own(strategy, n_files):
    cluster, estimator = ModelCluster(16, 32 * GIB, 8), Estimator()
    cache = PlanCache(cluster.shape(), Scenario("throttler", strategy=strategy))
    plan = cache.plan(uniform_estate([n_files]).groups[0], estimator)
    estimate, truth = plan_peaks(plan, estimator)
    assert estimate.peak_bytes == plan.task_peak_bytes
    assert truth.peak_bytes <= estimate.peak_bytes
    leaves, levels, final_inputs = tree_shape(plan)
    assert sum(leaves) == n_files and len(leaves) == plan.n_leaf_tasks


def test_the_deadline_search_finds_the_smallest_cluster():
    cluster = replace(ROOMY, storage=Storage(50e9, 1e9))
    scenario, cal = Scenario("throttler"), Calibration()
    answer = smallest_cluster(ESTATE, cluster, scenario, cal, 60.0)
    assert answer.workers is not None and answer.makespan_seconds <= 60.0
    if answer.workers > 1:
        assert simulate(ESTATE, replace(cluster, n_workers=answer.workers - 1), scenario, cal).makespan_seconds > 60.0
    starved = smallest_cluster(ESTATE, replace(cluster, storage=Storage(1e9, 1e9)), scenario, cal, 60.0)
    assert starved.workers is None and starved.simulations == 0


def test_the_flags_offer_the_models_policies_without_importing_the_simulator():
    assert arguments.POLICIES == POLICIES
    code = ("import sys, throttler.cli; throttler.cli.build_parser(); "
            "print(sorted(m for m in ('throttler.planning.planner', 'throttler.worker.kernels', 'pandas') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_writes_its_json(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("group_id,file,bytes\n" + "".join(f"g{i % 3},f{i}.parquet,100000000\n" for i in range(12)))
    parser = argparse.ArgumentParser()
    arguments.add_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["simulate", "--manifest", str(manifest), "--workers", "2", "--threads", "2",
                              "--worker-memory", "4GiB", "--storage-bandwidth", "0.1GB/s", "--json", str(out),
                              "--deadline", "10m"])
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    assert doc["bytes_read"] == 12 * 100_000_000
    assert doc["storage_bandwidth_bytes_per_second"] == 1e8
    assert doc["binding_resource"] == "storage bandwidth"
    assert doc["makespan_seconds"] >= doc["lower_bounds"]["storage_bound_seconds"] == 12.0
    assert set(doc["policies"]) == {"(a) all at once", "(b) fixed pool, 256 groups", "(c) resources only",
                                    "(d) throttler"}
    assert "smallest cluster" in capsys.readouterr().out

"""glibc's mmap threshold during throttler tasks (throttler/worker/allocator.py).

The policy (which environments fixed the threshold) is checked on plain dicts;
the effect in real processes, by where glibc serves a 1 MiB block
(:mod:`tests.helpers.glibc`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from throttler.worker import allocator

REPO = Path(__file__).resolve().parents[2]
NANNY = {"MALLOC_TRIM_THRESHOLD_": "65536"}  #: what Dask's nanny gives every worker process


@pytest.mark.parametrize("environ, fixed", [
    ({}, False),  # glibc's dynamic threshold: nothing to do
    (NANNY, True),
    ({"MALLOC_TOP_PAD_": "0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, True),
    ({**NANNY, "MALLOC_MMAP_THRESHOLD_": "1048576"}, False),  # the operator chose one: kept
    ({**NANNY, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),
])
def test_only_a_threshold_fixed_by_the_trim_variables_is_raised(environ, fixed):
    assert allocator.threshold_fixed_by(environ) is fixed


PROBE = r"""
import json
from tests.helpers.glibc import mapped_on_its_own
from throttler.worker import allocator

report = {"before": mapped_on_its_own()}
with allocator.task_heap():
    report["in_task"] = mapped_on_its_own()
    with allocator.task_heap():  # a second task in another thread of the same worker
        pass
    report["in_task_after_another_ended"] = mapped_on_its_own()
report["after"] = mapped_on_its_own()
print(json.dumps(report))
"""


def _probe(environ: dict[str, str]) -> dict:
    return _probe_code(PROBE, environ)


def _probe_code(code: str, environ: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "THROTTLER_"))}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **environ}, capture_output=True, text=True,
                         check=True, timeout=60, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_under_the_nannys_variable_a_task_takes_blocks_from_the_heap_and_gives_the_threshold_back():
    assert _probe(NANNY) == {"before": 1, "in_task": 0, "in_task_after_another_ended": 0, "after": 1}


def test_a_worker_setting_of_zero_leaves_the_allocator_alone():
    assert _probe({**NANNY, "THROTTLER_TASK_MMAP_THRESHOLD_BYTES": "0"}) == {
        "before": 1, "in_task": 1, "in_task_after_another_ended": 1, "after": 1}


def test_an_operators_own_threshold_is_kept():
    assert _probe({**NANNY, "MALLOC_MMAP_THRESHOLD_": str(1 << 19)}) == {
        "before": 1, "in_task": 1, "in_task_after_another_ended": 1, "after": 1}


def test_the_setting_is_validated_and_read_from_the_environment():
    from throttler.config import ConfigError, load

    with pytest.raises(ConfigError, match="task_mmap_threshold_bytes must be >= 0"):
        load(overrides={"task_mmap_threshold_bytes": -1}, environ={})
    assert load(environ={"THROTTLER_TASK_MMAP_THRESHOLD_BYTES": "0"}).task_mmap_threshold_bytes == 0
    assert load(environ={}).task_mmap_threshold_bytes == 32 * 1024 * 1024


RELEASE_PROBE = r"""
import json
import numpy as np
import psutil
import pyarrow as pa
from throttler.worker.peakrss import Measured

def rss_mib():
    return psutil.Process().memory_info().rss >> 20

def churn():  # what a task's column reads leave behind: pyarrow buffers, all freed
    buffers = [pa.allocate_buffer(2 << 20) for _ in range(100)]
    for b in buffers:
        np.frombuffer(b, dtype=np.uint8)[:] = 1
    return {}

start = rss_mib()
churn()
plain = rss_mib() - start  # freed, but kept by pyarrow's allocator
Measured(churn)()
measured = rss_mib() - start
print(json.dumps({"plain": plain, "measured": measured}))
"""


def test_every_task_ends_by_giving_back_what_pyarrow_kept_cached():
    grown = _probe_code(RELEASE_PROBE, NANNY)
    assert grown["plain"] >= 150, grown  # 200 MiB freed, most of it still resident: the allocator's cache
    assert grown["measured"] <= 50, grown

"""The one-shot commands as a user runs them: generate, run (embedded cluster), plan."""

from __future__ import annotations

import csv
import os
import re

from tests.helpers.daemon import throttler_cli
from tests.helpers.datafiles import assert_matches_reference


def _manifest(root):
    with open(root / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    groups = {}
    for row in rows:
        groups.setdefault(row["group_id"], []).append(str(root / row["file"]))
    return groups


def test_generate_then_run_with_manifest_and_a_failing_group(tmp_path):
    root, out = tmp_path / "estate", tmp_path / "out"
    gen = throttler_cli("generate", "--root", str(root), "--groups", "3", "--max-files", "5", "--paths", "40",
                        "--dates", "6", "--physical-files", "2")
    assert gen.returncode == 0, gen.stderr
    groups = _manifest(root)
    assert len(groups) == 3 and max(len(f) for f in groups.values()) == 5
    assert len({os.stat(f).st_ino for files in groups.values() for f in files}) == 2  # hard links

    run = throttler_cli("run", "g00000", "g00001", "no-such", "--data-root", str(root), "--output", str(out),
                        "--manifest", str(root / "manifest.csv"), "--workers", "1",
                        "--worker-memory-bytes", "1000000000", timeout_seconds=120)
    assert run.returncode == 1, run.stdout + run.stderr  # one group failed
    lines = run.stdout.splitlines()
    assert any(line.startswith("ok     g00000: 240 rows") and "aligned" in line for line in lines), lines
    assert all(re.search(r", worker peak \d+% of its limit\)", line) for line in lines if line.startswith("ok")), lines
    assert any(line.startswith("FAILED no-such:") and "not in manifest" in line for line in lines), lines
    for group in ("g00000", "g00001"):
        assert_matches_reference(out / f"{group}.parquet", groups[group])
    assert not (out / "no-such.parquet").exists()


def test_run_exits_zero_when_every_group_succeeds_with_directory_catalog(tmp_path):
    root = tmp_path / "estate"
    assert throttler_cli("generate", "--root", str(root), "--groups", "2", "--max-files", "3", "--paths", "20",
                         "--dates", "4").returncode == 0
    run = throttler_cli("run", "g00000", "g00001", "--data-root", str(root), "--output", str(tmp_path / "o"),
                        "--strategy", "sum", "--workers", "1", "--worker-memory-bytes", "1000000000",
                        timeout_seconds=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("(sum,") == 2


def test_demo_as_the_readme_runs_it(tmp_path):
    """The README's first command: ``throttler demo`` with its defaults, from a fresh directory."""
    import subprocess
    import sys

    from tests.helpers.daemon import child_env

    done = subprocess.run([sys.executable, "-m", "throttler", "demo"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=child_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("generated 6 groups (") and "demo-estate/data" in lines[0], lines
    verified = [line for line in lines if line.endswith("equals pandas groupby")]
    assert len(verified) == 6 and not any("MISMATCH" in line for line in lines), lines
    assert any(line.startswith("no-such-group") and "failed" in line and "reason:" in line for line in lines), lines
    assert lines[-1] == "all outputs verified"
    outputs = sorted(p.name for p in (tmp_path / "demo-estate" / "output").iterdir())
    assert len(outputs) == 6 and all(name.endswith(".parquet") for name in outputs)

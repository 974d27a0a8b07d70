"""deploy/: the unit verifies cleanly, scores <= 2.0 exposure, and the files agree.

``systemd-analyze verify`` exits 0 on many warnings, so stderr must be empty;
it also needs ExecStart's binary to exist, so a copy with ExecStart pointed at
this Python is verified, and the shipped file may differ only in that line.
sysusers and tmpfiles are applied for real into a scratch root.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from throttler.ops.metrics import parse_address

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "throttler.service"
SHIPPED_EXEC_START = "ExecStart=/usr/local/bin/throttler serve --config /etc/throttler/throttler.toml"
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: apt-get install systemd"  # fail, never skip (CI must have it)
    return path


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; keys may repeat, as in systemd."""
    entries, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, val = line.partition("=")
        entries.append((section, key.strip(), val.strip()))
    return entries


def directive(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == (section, key)]


@pytest.fixture(scope="module")
def runnable_unit(tmp_path_factory) -> Path:
    """The unit with ExecStart pointing at an executable that exists here."""
    text = UNIT.read_text()
    assert text.count(SHIPPED_EXEC_START + "\n") == 1
    exec_start = f"ExecStart={sys.executable} -m throttler serve --config /etc/throttler/throttler.toml"
    path = tmp_path_factory.mktemp("unit") / "throttler.service"
    path.write_text(text.replace(SHIPPED_EXEC_START, exec_start))
    return path


def test_copy_differs_only_in_exec_start(runnable_unit):
    shipped, copy = UNIT.read_text().splitlines(), runnable_unit.read_text().splitlines()
    assert len(shipped) == len(copy)
    differing = [(a, b) for a, b in zip(shipped, copy) if a != b]
    assert len(differing) == 1 and differing[0][0] == SHIPPED_EXEC_START


def test_systemd_analyze_verify_is_silent(runnable_unit):
    result = subprocess.run([tool("systemd-analyze"), "verify", str(runnable_unit)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_security_exposure_at_most_2(runnable_unit):
    # --threshold takes tenths: 20 means an overall exposure of 2.0.
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
         str(runnable_unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for throttler\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("key, expected", [
    ("Type", "notify"),  # not notify-reload: systemd 252
    ("NotifyAccess", "main"),
    ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ("WatchdogSec", "30"),
    ("Restart", "on-failure"),
    ("KillSignal", "SIGTERM"),
    ("User", "throttler"),
    ("ProtectSystem", "strict"),
    ("NoNewPrivileges", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("CapabilityBoundingSet", ""),
    ("IPAddressDeny", "any"),
    ("IPAddressAllow", "localhost"),
    ("UMask", "0027"),
])
def test_unit_directives(key, expected):
    assert directive(key) == [expected]


def test_stop_timeout_covers_drain_timeout():
    config = tomllib.loads((DEPLOY / "throttler.toml").read_text())
    (timeout_stop,) = directive("TimeoutStopSec")  # and 30 s left to close the cluster
    assert int(timeout_stop) >= config["drain_timeout_seconds"] + 30


def test_example_config_loads():
    """The shipped example goes through the daemon's own loader and validation."""
    from throttler.config import load

    config = load(str(DEPLOY / "throttler.toml"), environ={})
    assert config.scheduler is None  # "" -> embedded cluster
    assert config.allowed_uids is None  # commented out: an empty list would refuse everyone
    assert parse_address(config.metrics_address) == ("127.0.0.1", 9464)
    assert 0 < config.memory_fraction < 0.8  # below distributed's pause threshold
    (exec_start,) = directive("ExecStart")
    assert "--config /etc/throttler/throttler.toml" in exec_start
    writable = directive("ReadWritePaths")[0].split()
    assert config.spool in writable and config.output in writable
    commented = {line.lstrip("# ").split(" =")[0] for line in (DEPLOY / "throttler.toml").read_text().splitlines()
                 if re.match(r"#? ?[a-z_]+ = ", line)}
    assert {"spool", "data_root", "output", "manifest", "scheduler", "builder_threads", "submitter_threads",
            "memory_fraction", "metrics_address", "drain_timeout_seconds", "rescan_seconds",
            "allowed_uids"} <= commented


def test_sysusers_and_tmpfiles_apply(tmp_path):
    """Create the user, then the directories, in a scratch root; check owners and modes."""
    (tmp_path / "etc").mkdir()
    for command in (
        [tool("systemd-sysusers"), f"--root={tmp_path}", str(DEPLOY / "throttler.sysusers")],
        [tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create", str(DEPLOY / "throttler.tmpfiles")],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    passwd = dict(line.split(":", 1) for line in (tmp_path / "etc/passwd").read_text().splitlines())
    uid, gid = (int(x) for x in passwd["throttler"].split(":")[1:3])
    modes = {"var/spool/throttler/incoming": 0o3770, "var/spool/throttler/tmp": 0o3770,
             "var/spool/throttler/active": 0o750, "var/lib/throttler/output": 0o2750}
    for rel, mode in modes.items():
        st = (tmp_path / rel).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, mode), rel
    for path in directive("ReadWritePaths")[0].split():  # the unit fails to start if one is missing
        assert (tmp_path / path.lstrip("/")).is_dir(), path

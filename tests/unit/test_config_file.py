"""The TOML file's layout: keys at top level or under ``[throttler]``, never both."""

from __future__ import annotations

import pytest

from throttler.config import DEFAULTS, ConfigError, load


def _load(tmp_path, text):
    path = tmp_path / "throttler.toml"
    path.write_text(text)
    return load(str(path), environ={})


def test_keys_at_top_level_or_under_throttler_are_read_alike(tmp_path):
    top = _load(tmp_path, 'memory_fraction = 0.3\nspool = "/tmp/x"\n')
    table = _load(tmp_path, '[throttler]\nmemory_fraction = 0.3\nspool = "/tmp/x"\n')
    assert (top.memory_fraction, top.spool) == (0.3, "/tmp/x")
    assert table == top
    assert DEFAULTS.memory_fraction == 0.6  # so 0.3 above came from the file


def test_top_level_keys_beside_a_throttler_table_are_refused_not_dropped(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, 'memory_fraction = 0.3\nfan_in = 4\n[throttler]\nspool = "/tmp/x"\n')
    assert str(err.value) == (
        f"config file {tmp_path / 'throttler.toml'}: key(s) fan_in, memory_fraction at top level and a "
        "[throttler] table; put every key at top level or every key under [throttler], not both")


def test_a_throttler_key_that_is_not_a_table_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "throttler = 3\n")
    assert str(err.value) == f"config file {tmp_path / 'throttler.toml'}: throttler must be a table ([throttler]), not 3"


def test_another_table_is_an_unknown_key_as_before(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, 'spool = "/tmp/x"\n[logging]\nlevel = "INFO"\n')
    assert str(err.value) == "unknown configuration key(s): logging"


def test_local_paths_are_made_absolute_and_urls_are_left_as_given(tmp_path, monkeypatch):
    """Paths go to workers that may run in another directory: relative ones are resolved here."""
    monkeypatch.chdir(tmp_path)
    cfg = load(overrides={"spool": "q", "data_root": "s3://bucket/estate", "output": "out/x",
                          "manifest": "file:///srv/manifest.csv"}, environ={})
    assert (cfg.spool, cfg.data_root, cfg.output, cfg.manifest) == \
        (str(tmp_path / "q"), "s3://bucket/estate", str(tmp_path / "out" / "x"), "file:///srv/manifest.csv")
    assert load(environ={}).output == str(tmp_path / "output")

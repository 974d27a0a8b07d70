"""Configuration: one table of defaults, a TOML file, environment overrides, flags.

Every other module takes its defaults from :data:`DEFAULTS`; none repeats a value.
Precedence, highest first: command-line flags, ``THROTTLER_<NAME>`` environment
variables, the TOML file, the defaults below. :func:`load` validates the result
and raises ``ConfigError`` with every problem at once.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from throttler.planning.plan import STRATEGY_CHOICES


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem."""


@dataclass(frozen=True)
class Config:
    spool: str = "spool"
    data_root: str = "data"
    output: str = "output"
    manifest: str | None = None
    scheduler: str | None = None  #: None: start an embedded local cluster
    strategy: str = "auto"  #: default strategy of requests that name none
    builder_threads: int = 0  #: 0: derived from the cluster
    submitter_threads: int = 0  #: 0: derived from the cluster
    #: share of each worker's memory limit admission may fill: Dask's target
    #: threshold (0.6, where spilling starts), below spill 0.7, pause 0.8, terminate 0.95
    memory_fraction: float = 0.6
    fan_in: int = 8  #: partial results one combine task adds
    max_attempts: int = 4  #: attempts of a group that killed a worker (re-planned each time)
    max_transient_attempts: int = 12  #: attempts through scheduler or storage outages
    max_head_wait_seconds: float = 60.0  #: after this, small groups stop jumping a waiting big one
    poll_seconds: float = 0.25  #: how often a waiting group re-reads the scheduler
    rescan_seconds: float = 5.0  #: full spool rescan period, whatever inotify says
    drain_timeout_seconds: float = 300.0
    #: a worker found unable to read the data root or write the output is withdrawn from our tasks
    #: and checked again this often (throttler/ops/status.py)
    worker_recheck_seconds: float = 30.0
    metrics_address: str | None = "127.0.0.1:9464"  #: "" or None: no metrics endpoint
    allowed_uids: tuple[int, ...] | None = None  #: None: any owner may write requests
    workers: int = 0  #: embedded cluster: worker processes (0: derived from the machine)
    threads_per_worker: int = 0  #: embedded cluster (0: derived)
    worker_memory_bytes: int = 0  #: embedded cluster: memory limit per worker (0: derived)
    #: a worker started without a memory limit is sized as if it had this one (0: its host's memory
    #: divided by the workers on that host)
    assumed_worker_memory_bytes: int = 0
    log_level: str = "INFO"
    watch: bool = False  #: serve: queue a group when the files of its directory change (local data roots)
    watch_debounce_seconds: float = 2.0  #: serve --watch: a group is queued once its files are this quiet
    #: ranged GETs an aligned leaf keeps in flight for one object store file (its key ranges, then its
    #: row groups' value chunks; never ahead of the file summed); local files are read in sequence.
    #: Given to the workers by a plugin (throttler/cluster/worker_settings.py); a worker's own
    #: THROTTLER_OBJECT_STORE_READS_IN_FLIGHT wins.
    object_store_reads_in_flight: int = 8
    #: while a dense task runs on a worker whose glibc mmap threshold the nanny's
    #: MALLOC_TRIM_THRESHOLD_ fixed at 128 KiB, blocks under this come from the heap (reused, not
    #: mapped and faulted in afresh), the heap's free pages returned when the task ends
    #: (throttler/worker/allocator.py); 0: leave the allocator alone. A worker setting, as above.
    task_mmap_threshold_bytes: int = 32 * 1024 * 1024
    #: output row groups a final task encodes at once, each into a Parquet part in memory, stitched
    #: into the one output file in order (throttler/worker/parquet_parts.py): the group's last step
    #: uses the cores its finished leaves left idle. 1: encoded in turn. A worker setting, as above.
    output_encode_threads: int = 2


DEFAULTS = Config()
_FIELDS = {f.name: f for f in fields(Config)}


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Defaults < TOML file < environment < overrides (flags that were given)."""
    values: dict[str, Any] = {}
    if path:
        values.update(_read_toml(path))
    values.update(_from_environ(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}")
    config = replace(DEFAULTS, **{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    return replace(config, **_absolute_paths(config))


#: Keys holding a local path or a URL.
PATH_KEYS = ("spool", "data_root", "output", "manifest")


def _absolute_paths(config: Config) -> dict[str, str]:
    """The local paths of ``config`` made absolute against this process's directory (URLs as given).

    Paths go to the workers inside tasks, and a worker started elsewhere (``dask worker`` in
    another directory, on another host with the same mounts) resolves a relative one against its
    own directory: a relative ``--output`` was opened there and never found.
    """
    return {key: os.path.abspath(value) for key in PATH_KEYS
            if (value := getattr(config, key)) and "://" not in value}


def validate(config: Config) -> None:
    problems = []
    if config.strategy not in STRATEGY_CHOICES:
        problems.append(f"strategy must be one of {STRATEGY_CHOICES}, not {config.strategy!r}")
    if not 0.05 <= config.memory_fraction <= 0.95:
        problems.append("memory_fraction must be within [0.05, 0.95]")
    for name in ("builder_threads", "submitter_threads", "workers", "threads_per_worker", "worker_memory_bytes",
                 "assumed_worker_memory_bytes"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        problems.append(f"log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {config.log_level!r}")
    if config.task_mmap_threshold_bytes < 0:
        problems.append("task_mmap_threshold_bytes must be >= 0")
    if config.object_store_reads_in_flight < 1:
        problems.append("object_store_reads_in_flight must be >= 1")
    if config.output_encode_threads < 1:
        problems.append("output_encode_threads must be >= 1")
    if config.fan_in < 2:
        problems.append("fan_in must be >= 2")
    if config.max_attempts < 1 or config.max_transient_attempts < 1:
        problems.append("max_attempts and max_transient_attempts must be >= 1")
    for name in ("poll_seconds", "rescan_seconds", "drain_timeout_seconds", "watch_debounce_seconds",
                 "worker_recheck_seconds"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be > 0")
    if problems:
        raise ConfigError("; ".join(problems))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return _throttler_keys(data, path)


def _throttler_keys(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The keys of a parsed TOML file: its top level, or its ``[throttler]`` table.

    One or the other, never both: a table would otherwise hide the top-level keys
    beside it (they would be dropped without a word). No other table is read.
    """
    if "throttler" not in data:
        return data
    table = data["throttler"]
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: throttler must be a table ([throttler]), not {table!r}")
    others = sorted(set(data) - {"throttler"})
    if others:
        raise ConfigError(f"config file {path}: key(s) {', '.join(others)} at top level and a [throttler] table; "
                          "put every key at top level or every key under [throttler], not both")
    return table


def _from_environ(environ) -> dict[str, Any]:
    prefix = "THROTTLER_"
    return {k[len(prefix):].lower(): v for k, v in environ.items()
            if k.startswith(prefix) and k[len(prefix):].lower() in _FIELDS}


def _coerce(name: str, value: Any) -> Any:
    """Turn strings from the environment into the field's type."""
    kind = str(_FIELDS[name].type)
    if value in ("", None) and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            return _boolean(value)
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(int(x) for x in items if str(x).strip())
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from None


def _boolean(value: Any) -> bool:
    """A bool, or its spelling in the environment or a file (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)

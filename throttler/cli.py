"""The throttler command line: serve, submit, status, plan, run, generate, demo, simulate."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from throttler import __version__
from throttler.config import DEFAULTS, ConfigError, load
from throttler.errors import ThrottlerError
from throttler.planning.plan import STRATEGY_CHOICES
from throttler.simulation import arguments as simulate_arguments

log = logging.getLogger("throttler")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read when distributed is imported
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ThrottlerError) as exc:
        print(f"throttler: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command without signal handling of its own, stopped by Ctrl-C
        print("throttler: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="throttler", description=__doc__)
    parser.add_argument("--version", action="version", version=f"throttler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _submit_parser(sub)
    _status_parser(sub)
    _plan_parser(sub)
    _run_parser(sub)
    _generate_parser(sub)
    _demo_parser(sub)
    simulate_arguments.add_parser(sub)
    return parser


def _add_data_flags(p, output=True) -> None:
    p.add_argument("--data-root", required=True, help="directory holding the estate")
    p.add_argument("--manifest", help="CSV or Parquet with columns group_id, file (relative to --data-root)")
    if output:
        p.add_argument("--output", required=True, help="directory for one <group>.parquet per group")


def _add_cluster_flags(p) -> None:
    p.add_argument("--scheduler", help="Dask scheduler address; none: an embedded local cluster")
    p.add_argument("--workers", type=int, default=0, help="embedded cluster: worker processes")
    p.add_argument("--worker-memory-bytes", type=int, default=0, help="embedded cluster: limit per worker")
    p.add_argument("--memory-fraction", type=float, default=DEFAULTS.memory_fraction,
                   help="share of worker memory to fill")


# ------------------------------------------------------------------------- serve


#: ``serve``'s flags: (flag, type, help). Each overrides the configuration key of the same
#: name (flags > THROTTLER_<KEY> > --config file > defaults, see throttler/config.py).
SERVE_FLAGS = (
    ("spool", str, (f"queue directory: requests in incoming/, claimed in active/, records in done/ and failed/ "
                    f"(default {DEFAULTS.spool})")),
    ("data-root", str, (f"directory (or s3://, gs://, abfs[s]:// prefix) holding the estate "
                        f"(default {DEFAULTS.data_root})")),
    ("output", str, (f"directory (or object store prefix) for one <group>.parquet per group "
                     f"(default {DEFAULTS.output})")),
    ("manifest", str, ("CSV or Parquet with columns group_id, file (relative to --data-root); "
                       "default: one group per directory under the data root")),
    ("scheduler", str, "Dask scheduler address, e.g. tcp://scheduler:8786; none: an embedded local cluster"),
    ("metrics-address", str, (f"HOST:PORT of the Prometheus endpoint; '' for none "
                              f"(default {DEFAULTS.metrics_address})")),
    ("strategy", str, (f"strategy of requests that name none: {', '.join(STRATEGY_CHOICES)} "
                       f"(default {DEFAULTS.strategy})")),
    ("log-level", str, f"DEBUG, INFO, WARNING, ERROR or CRITICAL (default {DEFAULTS.log_level})"),
    ("builder-threads", int, "threads resolving, planning and building groups (default 0: derived from the cluster)"),
    ("submitter-threads", int, "threads admitting planned groups to the cluster (default 0: 2)"),
    ("workers", int, "embedded cluster: worker processes (default 0: derived from the machine)"),
    ("threads-per-worker", int, "embedded cluster: threads of each worker (default 0: derived)"),
    ("worker-memory-bytes", int, "embedded cluster: memory limit per worker (default 0: derived)"),
    ("assumed-worker-memory-bytes", int, ("a worker started without a memory limit is sized as if it had this one "
                                          "(default 0: its host's memory divided by the workers on that host)")),
    ("memory-fraction", float, (f"share of each worker's memory limit admission may fill, within [0.05, 0.95] "
                                f"(default {DEFAULTS.memory_fraction}, Dask's target threshold)")),
    ("drain-timeout-seconds", float, (f"on SIGTERM or SIGINT, how long running groups may finish before they are "
                                      f"put back in incoming/ (default {DEFAULTS.drain_timeout_seconds:g})")),
    ("rescan-seconds", float, (f"full spool rescan period, whatever inotify says "
                               f"(default {DEFAULTS.rescan_seconds:g})")),
    ("poll-seconds", float, f"how often a waiting group re-reads the scheduler (default {DEFAULTS.poll_seconds:g})"),
    ("watch-debounce-seconds", float, (f"with --watch: a group is queued once its files have been this quiet "
                                       f"(default {DEFAULTS.watch_debounce_seconds:g})")),
)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon",
                       description="Serve the spool: each flag overrides the configuration key of the same name "
                                   "(flags > THROTTLER_<KEY> environment variables > --config file > defaults).")
    p.add_argument("--config", help="TOML configuration file (keys at top level or under [throttler])")
    for flag, kind, text in SERVE_FLAGS:
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=kind, help=text)
    p.add_argument("--watch", action="store_const", const=True,
                   help="queue a group when the files of its directory change (local data root, no manifest)")
    p.set_defaults(func=cmd_serve)


def _serve_overrides(args) -> dict:
    skip = {"command", "func", "config"}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def cmd_serve(args) -> int:
    from throttler.commands import serve as daemon

    overrides = _serve_overrides(args)
    cfg = load(args.config, overrides)
    logging.getLogger().setLevel(daemon.log_level_number(cfg.log_level))
    return daemon.serve(cfg, args.config, overrides)


# ------------------------------------------------------------------------- submit / status


def _submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="queue groups for the daemon")
    p.add_argument("groups", nargs="+", metavar="GROUP")
    p.add_argument("--spool", required=True, help="the spool directory the daemon serves")
    p.add_argument("--priority", type=int, default=0,
                   help="higher is claimed and admitted first, then by arrival (default 0)")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, help="default: the daemon's configured strategy")
    p.add_argument("--full", action="store_true", help="a full run, even when the previous output could be extended")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args) -> int:
    from throttler.commands import checks
    from throttler.spool.queue import Spool

    checks.group_ids(args.groups)
    if not os.path.isdir(os.path.join(args.spool, "incoming")):
        print(f"throttler: no spool at {args.spool} yet: creating it (a daemon serving another --spool "
              "will not see these requests)", file=sys.stderr)
    spool = Spool(args.spool).ensure()
    for group in args.groups:
        path = spool.submit(group, priority=args.priority, strategy=args.strategy, full=args.full)
        print(f"queued {group} as {path.name}")
    return 0


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="is the daemon running; queue depths, running groups, cluster memory "
                                      "(exit 3 when the daemon is not running)")
    p.add_argument("--spool", required=True, help="the spool directory the daemon serves")
    p.add_argument("--json", action="store_true", help="the whole report as JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    from throttler.commands import checks, status

    checks.readable_directory(args.spool, "spool")
    return status.main(args.spool, args.json)


# ------------------------------------------------------------------------- plan / run


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="dry run: files, bytes, estimate, chunking, would it fit now")
    p.add_argument("group")
    _add_data_flags(p, output=False)
    _add_cluster_flags(p)
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from throttler.commands import checks, plan

    checks.group_ids([args.group])
    checks.data_inputs(args.data_root, args.manifest)
    files, footers_seconds = plan.read_group(args.group, args.data_root, args.manifest)  # before any cluster
    client, cluster = _connect(args)
    try:
        return plan.main(args.group, files, footers_seconds, args.strategy, args.memory_fraction, client)
    finally:
        _disconnect(client, cluster)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="aggregate groups now and exit (1 if any failed, 2 on bad inputs, 128 + N on signal N)")
    p.add_argument("groups", nargs="+", metavar="GROUP")
    _add_data_flags(p)
    _add_cluster_flags(p)
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--full", action="store_true",
                   help="read every file of each group, even when its previous output could be extended")
    p.add_argument("--progress-seconds", type=float, default=10.0,
                   help="when stderr is not a terminal: one progress line per group this often")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from throttler.commands import checks, run
    from throttler.commands.progress_display import ProgressDisplay, choose_mode
    from throttler.config import load

    checks.group_ids(args.groups)
    checks.data_inputs(args.data_root, args.manifest)
    checks.writable_directory(args.output, "output", create=True)
    cfg = load(overrides={"data_root": args.data_root, "output": args.output, "manifest": args.manifest,
                          "memory_fraction": args.memory_fraction, "metrics_address": None}, environ={})
    display = ProgressDisplay(choose_mode(args.quiet), args.progress_seconds)
    interrupt = run.Interrupt()
    interrupt.install()  # before the cluster starts: a Ctrl-C then stops the run as soon as it connects
    client, cluster = _connect(args)
    try:
        results = run.run_groups(cfg, client, args.groups, args.strategy, display,
                                 print_line=lambda line: print(line, flush=True), full=args.full,
                                 interrupt=interrupt)
    finally:
        _disconnect(client, cluster)
    if results.stopped:
        run.sweep_stopped(cfg.output, results.stopped)
        return interrupt.exit_code
    return 1 if results.failed else 0


def _connect(args):
    if args.scheduler:
        from distributed import Client

        try:
            return Client(args.scheduler, timeout="30s"), None
        except OSError as exc:
            raise ThrottlerError(f"cannot connect to the scheduler {args.scheduler}: {exc}") from None
    from throttler.cluster.embedded import start_embedded_cluster

    cluster, client = start_embedded_cluster(args.worker_memory_bytes or None, args.workers or None)
    return client, cluster


def _disconnect(client, cluster) -> None:
    client.close()
    if cluster is not None:
        cluster.close()


# ------------------------------------------------------------------------- generate / demo


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="write a synthetic estate shaped like the seed's")
    p.add_argument("--root", required=True)
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--max-files", type=int, default=50)
    p.add_argument("--min-files", type=int, default=2)
    p.add_argument("--paths", type=int, default=50_000)
    p.add_argument("--dates", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--physical-files", type=int, help="write this many real files; the rest are hard links")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from throttler.commands.generate import EstateSpec, write_estate

    spec = EstateSpec(groups=args.groups, max_files=args.max_files, min_files=args.min_files,
                      paths=args.paths, dates=args.dates, seed=args.seed, physical_files=args.physical_files)
    groups = write_estate(args.root, spec)
    total = sum(len(f) for f in groups.values())
    print(f"wrote {len(groups)} groups, {total} files ({args.paths * args.dates:,} rows each) under "
          f"{args.root}; manifest {args.root}/manifest.csv")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate a small estate and process it with the daemon, end to end")
    p.add_argument("--dir", default="demo-estate")
    p.add_argument("--groups", type=int, default=6)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from throttler.commands.demo import run_demo

    return run_demo(args.dir, args.groups)

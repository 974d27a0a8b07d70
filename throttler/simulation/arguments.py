"""The ``throttler simulate`` flags, apart from the simulator: building the command line stays light.

Parsing ``--help`` or any other command must not import the planner and the
kernels that the simulation uses; :func:`cmd_simulate` imports them when the
command runs.
"""

from __future__ import annotations

from throttler.simulation.calibration import DAEMON_COSTS
from throttler.simulation.policy_names import POLICIES
from throttler.units import parse_bytes, parse_duration_seconds, parse_rate_bytes_per_second

COST_FLAGS = ("group_seconds", "file_seconds", "task_seconds", "round_seconds", "entry_seconds",
              "scheduler_seconds_per_task")


def cmd_simulate(args) -> int:
    from throttler.simulation.command import cmd_simulate as run

    return run(args)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="capacity planning: the estate on a modelled cluster and storage")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV or Parquet: group_id, file (under --data-root), optional bytes")
    src.add_argument("--case-study", action="store_true", help="the seed's ~140,000 files of ~140 MB, seeded")
    p.add_argument("--data-root", help="where the manifest's files are (default: the manifest's directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=140_000, help="case study: files in the estate")
    p.add_argument("--largest-group", type=int, default=18_000, help="case study: files of the largest group")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--threads", type=int, default=8, help="threads of each worker")
    p.add_argument("--worker-memory", type=parse_bytes, default=parse_bytes("32GiB"), help="e.g. 2.5GiB, 16GB")
    p.add_argument("--storage-bandwidth", type=parse_rate_bytes_per_second, default=float("inf"),
                   help="aggregate, e.g. 12.5GB/s")
    p.add_argument("--node-bandwidth", type=parse_rate_bytes_per_second, default=float("inf"),
                   help="each worker's link, e.g. 10Gbit/s")
    p.add_argument("--request-latency", type=parse_duration_seconds, default=0.0, help="per file read, e.g. 5ms")
    p.add_argument("--strategy", default="auto", choices=("auto", "aligned", "sum", "groupby"))
    p.add_argument("--pool-size", type=int, default=256, help="groups in flight under policy (b)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of " + ", ".join(POLICIES))
    for name in COST_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(DAEMON_COSTS, name),
                       help="calibrated cost (benchmarks/daemon_costs.py); default %(default)g")
    p.add_argument("--deadline", type=parse_duration_seconds,
                   help="print the smallest cluster meeting it, e.g. 30m")
    p.add_argument("--json", help="write the figures to this file")
    p.set_defaults(func=cmd_simulate)



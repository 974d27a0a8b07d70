"""What a first touch of memory costs on this machine: why cold runs pay more than warm ones.

    python benchmarks/memory_touch.py                 # 50 and 200 MiB, pauses of 0 and 5 s
    python benchmarks/memory_touch.py --sizes-mib 48,400 --pauses 0,1,3,10

Each row is a fresh process that fills a fresh array of SIZE MiB (``np.ones``:
every page faulted in and written), frees it, and fills another of the same
size, first at once, then after each pause. On a bare-metal Linux machine every
fill costs about the same (the kernel zeroes each page it hands out). On a
virtual machine whose guest reports freed pages back to its host (Linux's free
page reporting, ``page_reporting.page_reporting_order`` on the kernel command
line, as on Firecracker VMs), memory the guest has not used for a few seconds
must be faulted in by the host again: a first fill, or a fill after a pause, can
cost ten times more than an immediate re-fill.

That is what the ``cold`` columns of ``benchmarks/aggregate.py`` pay on such a
machine: a task's grids and accumulators (48 MB for 6M cells) are fresh memory
in a fresh worker, while ``--warm-process`` re-uses pages freed a moment before,
as a busy daemon's workers do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

MIB = 1 << 20


def fill_seconds(size_mib: int) -> float:
    """Seconds to fill a fresh array of ``size_mib`` MiB, which is freed afterwards."""
    started = time.perf_counter()
    block = np.ones(size_mib * MIB // 8)
    seconds = time.perf_counter() - started
    del block
    return seconds


def child(size_mib: int, pauses: list[float]) -> dict:
    first = fill_seconds(size_mib)
    after = {}
    for pause in pauses:
        time.sleep(pause)
        after[str(pause)] = fill_seconds(size_mib)
    return {"first": first, "after": after}


def page_reporting() -> str:
    try:
        with open("/proc/cmdline") as fh:
            words = [w for w in fh.read().split() if "page_reporting" in w]
    except OSError:
        return "unknown"
    return " ".join(words) or "not on the kernel command line"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="50,200")
    p.add_argument("--pauses", default="0,5", help="seconds between the first fill and each later one")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per size (medians)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    pauses = [float(x) for x in args.pauses.split(",")]
    if args.child:
        print(json.dumps(child(int(args.child), pauses)))
        return
    print(f"free page reporting: {page_reporting()}\n")
    print("| fresh array | first fill, fresh process | " + " | ".join(f"again after {x:g} s" for x in pauses) + " |")
    print("|---:|---:|" + "---:|" * len(pauses))
    for size in [int(x) for x in args.sizes_mib.split(",")]:
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", str(size), "--pauses", args.pauses],
                                          check=True, capture_output=True, text=True).stdout) for _ in range(args.runs)]
        first = float(np.median([r["first"] for r in runs]))
        later = [float(np.median([r["after"][str(x)] for r in runs])) for x in pauses]
        cells = [f"{1000 * s:.1f} ms ({1000 * s / size:.2f} ms/MiB)" for s in [first, *later]]
        print(f"| {size} MiB | " + " | ".join(cells) + " |")
    print(f"\nmedians of {args.runs} processes; command: python benchmarks/memory_touch.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()

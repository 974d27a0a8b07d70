"""What a first touch of memory costs on this machine: why cold runs pay more than warm ones.

    python benchmarks/memory_touch.py                 # 50 and 200 MiB, pauses of 0 and 5 s
    python benchmarks/memory_touch.py --sizes-mib 48,400 --pauses 0,1,3,10
    python benchmarks/memory_touch.py --sizes-mib 4096 --runs 1 --residency bench-data/aggregate

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

A VM may also take back its page cache. Linux's DAMON can run a ``pageout``
scheme over physical memory (``/sys/kernel/mm/damon/admin``): regions not
accessed for its minimum age are reclaimed, free memory or not. Files not read
for that long then come from the virtual disk again, into fresh memory that the
host must fault in. The header prints the schemes found; ``--residency DIR``
prints how much of the Parquet files under DIR is in the page cache
(``mincore`` over a read-only mapping of each file), before the fills.
"""

from __future__ import annotations

import argparse
import glob
import json
import mmap
import os
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


def damon_schemes(root: str = "/sys/kernel/mm/damon/admin/kdamonds") -> list[str]:
    """The DAMON schemes running, as "ACTION of regions idle >= N s" (empty: none or no DAMON)."""
    found = []
    for context in sorted(glob.glob(os.path.join(root, "*", "contexts", "*"))):
        try:
            with open(os.path.join(context, "..", "..", "state")) as fh:
                if fh.read().strip() != "on":
                    continue
            with open(os.path.join(context, "monitoring_attrs", "intervals", "aggr_us")) as fh:
                aggregation_seconds = int(fh.read()) / 1e6
            for scheme in sorted(glob.glob(os.path.join(context, "schemes", "[0-9]*"))):
                with open(os.path.join(scheme, "action")) as fh:
                    action = fh.read().strip()
                with open(os.path.join(scheme, "access_pattern", "age", "min")) as fh:
                    min_age = int(fh.read())
                found.append(f"{action} of regions idle >= {min_age * aggregation_seconds:g} s")
        except (OSError, ValueError):
            continue
    return found


def resident_bytes(path: str) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, its size), by ``mincore`` over a read-only mapping."""
    import ctypes

    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    page = mmap.PAGESIZE
    pages = -(-size // page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed", path)
        try:
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", path)
            in_cache = sum(b & 1 for b in vector.raw)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return min(size, in_cache * page), size


def residency_rows(root: str) -> list[str]:
    """A table row per folder under ``root`` holding Parquet files: MiB in the page cache of MiB."""
    folders: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)):
        cached, size = resident_bytes(path)
        totals = folders.setdefault(os.path.relpath(os.path.dirname(path), root), [0, 0])
        totals[0] += cached
        totals[1] += size
    return [f"| {folder} | {cached / MIB:.0f} of {size / MIB:.0f} MiB ({cached / size:.0%}) |"
            for folder, (cached, size) in folders.items() if size]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="50,200")
    p.add_argument("--pauses", default="0,5", help="seconds between the first fill and each later one")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per size (medians)")
    p.add_argument("--residency", metavar="DIR", help="first print how much of DIR's Parquet files is in the page cache")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    pauses = [float(x) for x in args.pauses.split(",")]
    if args.child:
        print(json.dumps(child(int(args.child), pauses)))
        return
    print(f"free page reporting: {page_reporting()}")
    print(f"DAMON schemes: {'; '.join(damon_schemes()) or 'none running'}\n")
    if args.residency:
        print("| folder | in the page cache |\n|---|---:|")
        print("\n".join(residency_rows(args.residency)) + "\n")
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

"""Peak RSS of four ways to combine groupby partials (one fresh process per method).

Each child makes ``--inputs`` partials with ``kernels.groupby_leaf`` (one seed-shaped
file each, data from calibrate_memory.py), resets VmHWM, combines, and prints the
peak RSS over its RSS just before the combine (the inputs are already held) and the
combine's seconds:

* ``pandas``: concat + pandas groupby sum (the kernel's regroup before ``regroup``);
* ``pyarrow``: concat as an Arrow table + ``Table.group_by(...).aggregate`` sum;
* ``regroup``: :func:`throttler.worker.regroup.regroup` (one int64 code a row, a stable
  argsort, ``np.add.reduceat``): what ``kernels.groupby_combine`` does when keys differ;
* ``add``: check the partials' key columns are equal, then ``np.add`` the values
  (``n/a`` when they differ).

    python benchmarks/groupby_combine_peak.py --data bench-data/calibrate/50000x120
    python benchmarks/groupby_combine_peak.py --files a.parquet,b.parquet   # keys that differ
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = ("pandas", "pyarrow", "regroup", "add")


def _combine(method: str, frames: list):
    """The combined frame (or table), or None for ``add`` when the keys differ."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from throttler.worker import kernels
    from throttler.worker.regroup import regroup_frames

    if method == "pandas":
        return kernels._grouped(pd.concat(frames, ignore_index=True))
    if method == "regroup":
        return regroup_frames(frames)
    if method == "pyarrow":
        table = pa.concat_tables([pa.Table.from_pandas(f, preserve_index=False) for f in frames])
        return table.group_by(["path", "Date"]).aggregate([("value", "sum", pa.compute.ScalarAggregateOptions(
            skip_nulls=False))])
    first = frames[0]
    keys = [first["path"].to_numpy(), first["Date"].to_numpy()]
    if not all(len(f) == len(first) and all(np.array_equal(k, f[c].to_numpy()) for k, c in zip(keys, ("path", "Date")))
               for f in frames[1:]):
        return None
    values = np.add(first["value"].to_numpy(), frames[1]["value"].to_numpy())
    for f in frames[2:]:
        values += f["value"].to_numpy()
    return pd.DataFrame({"path": keys[0], "Date": keys[1], "value": values})


def _child(method: str, files: list[str]) -> dict:
    import time

    from throttler.worker import kernels
    from throttler.worker.peakrss import high_water_mark_bytes, reset_high_water_mark

    frames = [kernels.groupby_leaf([f]).data for f in files]
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1]) * 4096
    reset_high_water_mark()
    started = time.perf_counter()
    out = _combine(method, frames)
    seconds = time.perf_counter() - started
    if out is None:
        return {"method": method, "rows": 0, "peak_over_before": 0, "seconds": 0.0}
    return {"method": method, "rows": len(out), "peak_over_before": high_water_mark_bytes() - before,
            "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="bench-data/calibrate/50000x120")
    p.add_argument("--files", help="comma-separated partials' files (instead of --data's first --inputs)")
    p.add_argument("--inputs", type=int, default=2)
    p.add_argument("--child")
    args = p.parse_args(argv)
    files = (args.files.split(",") if args.files else
             sorted(str(f) for f in Path(args.data, "g00000").glob("*.parquet"))[:args.inputs])
    if args.child:
        print(json.dumps(_child(args.child, files)))
        return 0
    print("| method | inputs | rows out | peak over RSS before, MiB | B/row out | seconds |\n"
          "|---|---:|---:|---:|---:|---:|")
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--files", ",".join(files), "--child", method],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if not r["rows"]:
            print(f"| {method} | {len(files)} | n/a (keys differ) | | | |", flush=True)
            continue
        print(f"| {method} | {len(files)} | {r['rows']:,} | {r['peak_over_before'] / 2**20:.0f} | "
              f"{r['peak_over_before'] / r['rows']:.0f} | {r['seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

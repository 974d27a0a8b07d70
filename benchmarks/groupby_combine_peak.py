"""Peak RSS of three ways to combine groupby partials (one fresh process per method).

Each child makes ``--inputs`` partials with ``kernels.groupby_leaf`` (one seed-shaped
file each, data from calibrate_memory.py), resets VmHWM, combines, and prints the
peak RSS over its RSS just before the combine (the inputs are already held):

* ``pandas``: today's ``kernels.groupby_combine`` (concat + groupby sum);
* ``pyarrow``: concat as an Arrow table + ``Table.group_by(...).aggregate`` sum;
* ``add``: check the partials' key columns are equal, then ``np.add`` the values.

    python benchmarks/groupby_combine_peak.py --data bench-data/calibrate/50000x120
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = ("pandas", "pyarrow", "add")


def _child(method: str, files: list[str]) -> dict:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from throttler.worker import kernels
    from throttler.worker.peakrss import high_water_mark_bytes, reset_high_water_mark

    parts = [kernels.groupby_leaf([f]) for f in files]
    with open("/proc/self/statm") as fh:
        before = int(fh.read().split()[1]) * 4096
    reset_high_water_mark()
    if method == "pandas":
        out = kernels.groupby_combine(parts).data
    elif method == "pyarrow":
        table = pa.concat_tables([pa.Table.from_pandas(p.data, preserve_index=False) for p in parts])
        out = table.group_by(["path", "Date"]).aggregate([("value", "sum", pa.compute.ScalarAggregateOptions(
            skip_nulls=False))])
    else:
        first = parts[0].data
        keys = [first["path"].to_numpy(), first["Date"].to_numpy()]
        assert all(np.array_equal(k, p.data[c].to_numpy()) for p in parts[1:] for k, c in zip(keys, ("path", "Date")))
        values = np.add(first["value"].to_numpy(), parts[1].data["value"].to_numpy())
        for p in parts[2:]:
            values += p.data["value"].to_numpy()
        out = pd.DataFrame({"path": keys[0], "Date": keys[1], "value": values})
    return {"method": method, "rows": len(out), "peak_over_before": high_water_mark_bytes() - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="bench-data/calibrate/50000x120")
    p.add_argument("--inputs", type=int, default=2)
    p.add_argument("--child")
    args = p.parse_args(argv)
    files = sorted(str(f) for f in Path(args.data, "g00000").glob("*.parquet"))[:args.inputs]
    if args.child:
        print(json.dumps(_child(args.child, files)))
        return 0
    print(f"| method | inputs | rows | peak over RSS before, MiB | B/row |\n|---|---:|---:|---:|---:|")
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--inputs", str(args.inputs),
                              "--child", method], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {method} | {args.inputs} | {r['rows']:,} | {r['peak_over_before'] / 2**20:.0f} | "
              f"{r['peak_over_before'] / r['rows']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Before/after of the sweep targets, interleaved: `python -m benchmarks.sweep_ab --baseline-code DIR`.

The two target sweeps of `benchmarks.sweep` (the warm sweep, at one or more sizes, and the balance
sweep), for this checkout and another (`--baseline-code`, e.g. an export of main), in the order
after, before, before, after for each (the load of a shared machine drifts; ABBA cancels a linear
drift). Both sides are scored by this checkout's definitions (own = loop + final validation; the
loop-only ratio beside it), from the run dirs and timelines each side writes. Prints one JSON line
per sweep and a table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.sweep import REPO, SweepBenchConfig, _balance, _warm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep_ab", description=__doc__.splitlines()[0])
    p.add_argument("--baseline-code", required=True, help="another checkout of the toolkit (the 'before')")
    p.add_argument("--runs", default="16,36", help="comma-separated sizes of the warm sweep")
    p.add_argument("--no-balance", action="store_true", help="skip the balance sweep")
    p.add_argument("--out", type=Path, help="also write every row as JSON lines here")
    args = p.parse_args(argv)
    codes = {"after": REPO, "before": Path(args.baseline_code).resolve()}
    sweeps = [(f"warm {n}", dataclasses.replace(SweepBenchConfig(), runs=int(n))) for n in args.runs.split(",")]
    if not args.no_balance:
        sweeps.append(("balance", SweepBenchConfig()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-ab-") as tmp:
        for label, cfg in sweeps:
            for side in ("after", "before", "before", "after"):
                out = Path(tmp) / f"{label.replace(' ', '-')}-{side}-{len(rows)}"
                load = os.getloadavg()[0]
                r = _balance(cfg, out, codes[side]) if label == "balance" else _warm(cfg, out, codes[side])
                shutil.rmtree(out)
                row = {"sweep": label, "side": side, "load_start": load, "load_end": os.getloadavg()[0],
                       **{k: v for k, v in r.items() if k != "timeline"},
                       **{f"t_{k}": v for k, v in r.get("timeline", {}).items() if k != "final_val_by_run"}}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    for row in rows:
        ratio, loop = ("wall_over_ideal", "wall_over_ideal_loop") if row["sweep"] == "balance" else \
            ("wall_over_own", "wall_over_loop")
        print(f"{row['sweep']:<9} {row['side']:<6} load {row['load_start']:.1f}→{row['load_end']:.1f} "
              f"wall {row['wall_s']:6.1f} s  ratio {row[ratio]:.3f}  (loop only {row[loop]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

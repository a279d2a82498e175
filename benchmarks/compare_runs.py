"""Largest relative difference between two run dirs, per training metric and per probe variable.

    python -m benchmarks.compare_runs RUN_A RUN_B [--rtol 1e-5]

Prints one JSON object: {"metrics": {name: max rel diff}, "probes": {variable: max rel diff}, "ok": bool}
(exit 1 when a difference exceeds --rtol). Used by benchmarks/gpu_device.sh to set a CUDA FSDP2 run
beside the plain run of the same configuration; the CPU tests do the same in tests/scaleout/test_fsdp.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name in ("loss", "grad_norm", "val_loss"):
            if name in row:
                values[(row["step"], name)] = row[name]
    return values


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(a == b, 0.0, np.abs(a - b) / np.abs(a))
    rel = np.where(both_nan, 0.0, rel)
    return float(np.max(rel)) if rel.size else 0.0


def compare(a: Path, b: Path) -> dict[str, dict[str, float]]:
    ma, mb = _metrics(a), _metrics(b)
    if ma.keys() != mb.keys():
        raise SystemExit(f"{a} and {b} logged different steps")
    metrics: dict[str, float] = {}
    for key in ma:
        metrics[key[1]] = max(metrics.get(key[1], 0.0), _rel(ma[key], mb[key]))
    probes = {}
    if (a / "probes.zarr").exists():
        with xr.open_zarr(a / "probes.zarr") as da, xr.open_zarr(b / "probes.zarr") as db:
            for name in da.data_vars:
                probes[name] = _rel(da[name].values, db[name].values)
    return {"metrics": metrics, "probes": probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args()
    result = compare(args.run_a, args.run_b)
    worst = max([*result["metrics"].values(), *result["probes"].values()], default=0.0)
    print(json.dumps({**result, "worst": worst, "rtol": args.rtol, "ok": worst <= args.rtol}))
    sys.exit(0 if worst <= args.rtol else 1)


if __name__ == "__main__":
    main()

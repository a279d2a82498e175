"""`python -m benchmarks`: trainer throughput vs a reference loop, probe overhead, linearization cost.

    python -m benchmarks            # the CPU targets' tiny model (several minutes)
    python -m benchmarks --quick    # a smaller model and fewer repeats (about a minute)
    python -m benchmarks --json     # print the JSON result instead of the table
    python -m benchmarks --out results.json
    python -m benchmarks --parts sweep   # local sweeps: warm workers, balance, report time (benchmarks.sweep)
    python -m benchmarks.sweep_ab --baseline-code DIR   # the two sweep targets, before/after, interleaved
The GPU benchmark (GPT-2-small shape, compiled, bf16) is `python -m benchmarks.gpu --out DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.suite import QUICK, BenchConfig, format_table, run_suite
from benchmarks.sweep import QUICK_SWEEP, SweepBenchConfig, format_sweep, run_sweep_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument("--parts", default="trainer,probes", help="comma-separated: trainer, probes, sweep")
    p.add_argument("--baseline-code", default="", help="sweep part: also time another checkout of the toolkit")
    p.add_argument("--sweep-runs", type=int, help="sweep part: runs in the warm sweep (SweepBenchConfig.runs)")
    for field in dataclasses.fields(BenchConfig):
        if field.type in ("int", "str"):
            p.add_argument("--" + field.name.replace("_", "-"), type=int if field.type == "int" else str,
                           help=f"BenchConfig.{field.name}")
    p.add_argument("--params", help="comma-separated parameterizations (sp, mup, depth-mup, completep)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    bench = QUICK if args.quick else BenchConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)
                 if f.type in ("int", "str") and getattr(args, f.name, None) is not None}
    if args.params:
        overrides["params"] = tuple(args.params.split(","))
    return dataclasses.replace(bench, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = tuple(args.parts.split(","))
    result = run_suite(config_from(args), parts)
    if "sweep" in parts:
        sweep_cfg = QUICK_SWEEP if args.quick else SweepBenchConfig()
        sweep_cfg = dataclasses.replace(sweep_cfg, baseline_code=args.baseline_code)
        if args.sweep_runs is not None:
            sweep_cfg = dataclasses.replace(sweep_cfg, runs=args.sweep_runs)
        result["sweep"] = run_sweep_bench(sweep_cfg)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    table = format_table(result) + ("\n" + "\n".join(format_sweep(result["sweep"])) if "sweep" in result else "")
    print(text if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

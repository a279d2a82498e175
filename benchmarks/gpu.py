"""The GPU benchmark: GPT-2-small shape, seq 1024, bf16 autocast, torch.compile, fused AdamW.

    python -m benchmarks.gpu --out DIR           # one CUDA GPU; planned for < 8 minutes with compilation
    python -m benchmarks.gpu --out DIR --quick   # a tiny CPU run of the same code path (the tests run it)

Writes DIR/gpu.json: the suite's ratios (trainer vs reference, probe overhead at k = 10 and 100,
linearization vs step) with ms/step, tokens/s, TFLOP/s and MFU (training FLOPs per token
6·N_matmul + 12·L·N·T, `trainer.model.flops_per_token`, over the dense bf16 peak of
`benchmarks.hardware.PEAK_BF16_TFLOPS`), the compile time, the graph breaks and recompilations that
Dynamo counted over every compiled step (probes enabled: the recorder probes on its schedule through
the eager module; two models, ours and the reference, so two graphs without recompilation), and the host
synchronisations inside one plain training step (CUDA sync debug mode).

Shape: width 768, depth 12, d_head 64 (12 heads), seq 1024, byte vocabulary (256, not GPT-2's 50257:
the toolkit is byte-level; the unembedding is then 0.2% of the FLOPs instead of 28%). A step is 64
sequences (4 micro-batches of 16, 65,536 tokens). Probes: ProbeConfig's default batch of 8 sequences,
linearization in float64 (the default on every device; gpu.json's `linearization_dtype` says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite import BenchConfig, format_table, run_suite

GPU = BenchConfig(width=768, depth=12, seq_len=1024, batch_size=64, grad_accum=4, probe_batch=8,
                  params=("completep",), log_every=10, block_steps=10, repeats=5, window_repeats=2,
                  warmup_steps=3, device="cuda", compile=True, threads=0)
# The same code path on a CPU in seconds: Dynamo traces (and counts graph breaks) with the eager backend.
QUICK = BenchConfig(width=64, depth=2, seq_len=32, batch_size=4, probe_batch=2, params=("completep",),
                    log_every=5, block_steps=2, repeats=2, window_repeats=1, warmup_steps=2, device="cpu",
                    compile=True, compile_backend="eager", threads=1)
BUDGET_S = 8 * 60  # the whole GPU run, compilation included


def dynamo_counts() -> dict[str, Any]:
    """Graph breaks (total, and by the first line of each reason) and graphs compiled, from Dynamo's
    counters. One graph per compiled model means that no probe step caused a recompilation."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        first = reason.splitlines()[0]
        reasons[first] = reasons.get(first, 0) + n
    return {"graph_breaks": sum(reasons.values()), "graph_break_reasons": reasons,
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "frames_compiled": counters["frames"].get("total", 0)}


def run(bench: BenchConfig, out_dir: Path) -> dict[str, Any]:
    import torch._dynamo

    t0 = time.perf_counter()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = run_suite(bench)
    result["dynamo"] = dynamo_counts()
    result["compile_backend"] = bench.compile_backend if bench.compile else None
    result["elapsed_s"] = time.perf_counter() - t0
    result["within_budget"] = result["elapsed_s"] <= BUDGET_S
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, Dynamo with the eager backend")
    p.add_argument("--batch-size", type=int, help="sequences per step (GPU default 64)")
    p.add_argument("--probe-batch", type=int, help="probe sequences (default 8)")
    args = p.parse_args(argv)
    bench = QUICK if args.quick else GPU
    if not args.quick and not torch.cuda.is_available():
        p.error("no CUDA device: run with --quick for the CPU check")
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("probe_batch", args.probe_batch)) if v}
    bench = dataclasses.replace(bench, **overrides)
    result = run(bench, args.out)
    print(format_table(result))
    d = result["dynamo"]
    print(f"  graph breaks {d['graph_breaks']}, compiled graphs {d['unique_graphs']}, "
          f"host syncs in a step {result['probe_details'].get('host_syncs_in_step')}, "
          f"elapsed {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

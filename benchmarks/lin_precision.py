"""Linearization precision: what float32 gets wrong at small LR factors, and what float64 costs.

    python -m benchmarks.lin_precision [--quick] [--json]

Accuracy: α = ½, width 64, depths 2 and 16, ten training steps, then one real AdamW step (clipped, as
the trainer does) at each LR factor from the same state; the depth 2 → 16 slope of the layer-mean
log lin_ratio per branch, evaluated in float64, in float32 as computed (no guard), and in float32
with the measured round-off floor (probes/linearization.py), where flagged values are left out, as
`analyses.laziness.ratio_table` leaves out NaN. Cost: one `ProbeSession.linearization`-equivalent
pass over every branch (the README's benchmark shape: width 128, depth 4, seq 128, probe batch 8,
linearization on 1 sequence) in float64, float32 with the floor, and float32 without it, interleaved
with a training step in one process (benchmarks/timing.py), on this machine's device.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.timing import interleaved, summarize
from probes.adapters import GPTAdapter
from probes.linearization import branch_linearization
from probes.schema import BRANCHES
from probes.session import ProbeSession
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig
from trainer.optim import set_lr
from trainer.parameterization import Parameterization

FACTORS = (1.0, 0.1, 0.01, 0.001)
MODES = ("float64", "float32", "float32_unguarded")


def _trainer(run_dir: Path, width: int, depth: int, seq_len: int, batch_size: int, alpha: float = 0.5) -> Trainer:
    param = Parameterization(name="alpha", alpha=alpha, width=width, depth=depth, base_width=256, lr_base=2**-10)
    train = TrainConfig(steps=10**6, batch_size=batch_size, warmup_frac=0.0, schedule="constant")
    return Trainer(RunSpec(param=param, model=ModelConfig(seq_len=seq_len), train=train), run_dir, quiet=True)


def linearize(session: ProbeSession, acts: dict, before: dict, after: dict, mode: str) -> dict:
    """Every branch's LinearizationResult in `mode` (the loop of ProbeSession.linearization, with the
    floor optional so that the three modes run the same code)."""
    session.linearization(acts, before, after)  # builds session._branches once
    dtype = torch.float64 if mode == "float64" else torch.float32
    out = {}
    with session.adapter.linearizable():
        for key, branch, site, local in session._branches:
            out[key] = branch_linearization(
                branch, acts[(key[0], site)][: session.lin_batch_size], {k: before[g] for k, g in local.items()},
                {k: after[g] for k, g in local.items()}, dtype=dtype, measure_floor=mode != "float32_unguarded")
    return out


def probe_step_results(depth: int, run_dir: Path, pre_steps: int = 10, seq_len: int = 64) -> dict:
    """{(factor, mode): {(layer, branch): LinearizationResult}} for one real update per LR factor."""
    trainer = _trainer(run_dir, 64, depth, seq_len, 8)
    for step in range(pre_steps):
        trainer.train_step(step)
    model, optimizer = trainer.model, trainer.optimizer
    session = ProbeSession(GPTAdapter(model), trainer.data.probe_batch(8).to(trainer.device), lin_batch_size=1)
    batch = trainer.data.train_batch(0, pre_steps, 8).to(trainer.device)
    model(batch[:, :-1], batch[:, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.spec.train.grad_clip)
    session.before_update(pre_steps)
    pending = session._pending
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    out = {}
    for factor in FACTORS:
        set_lr(optimizer, factor)
        optimizer.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        for mode in MODES:
            out[(factor, mode)] = linearize(session, pending["acts"], pending["before"], after, mode)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(copy.deepcopy(opt_state))  # loading aliases the tensors it is given
    return out


def accuracy(depths: tuple[int, int] = (2, 16)) -> dict[str, Any]:
    """Depth slopes of lin_ratio per LR factor, mode and branch; share of float32 values flagged."""
    with tempfile.TemporaryDirectory() as scratch:
        results = {d: probe_step_results(d, Path(scratch) / f"d{d}") for d in depths}
    rows = []
    for factor in FACTORS:
        for branch in BRANCHES:
            row: dict[str, Any] = {"lr_factor": factor, "branch": branch}
            for mode in MODES:
                means = []
                for depth in depths:
                    ratios = np.array([float(r.nonlin_norm / r.lin_norm) for (_, b), r
                                       in results[depth][(factor, mode)].items() if b == branch])
                    kept = ratios[np.isfinite(ratios)]
                    means.append(np.log(kept).mean() if kept.size else math.nan)
                row[f"slope_{mode}"] = (means[1] - means[0]) / math.log(depths[1] / depths[0])
            flagged = [bool(r.below_floor) for d in depths for (_, b), r in results[d][(factor, "float32")].items()
                       if b == branch]
            row["float32_flagged"] = f"{sum(flagged)}/{len(flagged)}"
            rows.append(row)
    return {"depths": list(depths), "rows": rows}


def cost(repeats: int, width: int = 128, depth: int = 4, seq_len: int = 128) -> dict[str, Any]:
    """Seconds of one linearization pass per mode and of one training step, interleaved; ratios."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _trainer(Path(scratch), width, depth, seq_len, 16, alpha=1.0)
        session = ProbeSession(GPTAdapter(trainer.model), trainer.data.probe_batch(8).to(trainer.device),
                               lin_batch_size=1)
        trainer.train_step(0)
        session.before_update(1)
        pending = session._pending
        trainer.train_step(1)
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        step = [2]

        def train_step() -> None:
            trainer.train_step(step[0])
            step[0] += 1

        cases = {mode: (lambda m=mode: linearize(session, pending["acts"], pending["before"], after, m))
                 for mode in MODES}
        cases["step"] = train_step
        for case in cases.values():  # untimed warm-up (torch.func's first call)
            case()
        times = interleaved(cases, repeats, trainer.device)
    out: dict[str, Any] = {"shape": {"width": width, "depth": depth, "seq_len": seq_len, "lin_sequences": 1},
                           "device": str(trainer.device), "torch": torch.__version__, "repeats": repeats}
    for mode in MODES:
        out[f"{mode}_ms"] = 1e3 * summarize(times.wall[mode])["median"]
        out[f"{mode}_vs_step"] = times.ratio(mode, "step")
    out["float64_vs_float32"] = times.ratio("float64", "float32")
    out["float64_vs_float32_unguarded"] = times.ratio("float64", "float32_unguarded")
    return out


def format_report(result: dict[str, Any]) -> str:
    lines = [f"lin_ratio slope, depth {result['accuracy']['depths'][0]} -> {result['accuracy']['depths'][1]}, "
             "alpha 0.5 (float32 = with the floor; flagged values left out)",
             f"{'LR factor':>9} {'branch':>6} {'float64':>8} {'float32':>8} {'unguarded':>9} {'flagged':>8}"]
    for r in result["accuracy"]["rows"]:
        lines.append(f"{r['lr_factor']:>9g} {r['branch']:>6} {r['slope_float64']:>+8.2f} {r['slope_float32']:>+8.2f} "
                     f"{r['slope_float32_unguarded']:>+9.2f} {r['float32_flagged']:>8}")
    c = result["cost"]
    lines.append(f"cost on {c['device']} ({c['shape']}), median [min, max] of {c['repeats']} interleaved repeats:")
    for key in ("float64_vs_float32", "float64_vs_float32_unguarded", "float64_vs_step", "float32_vs_step",
                "float32_unguarded_vs_step"):
        w = c[key]["wall"]
        cpu = c[key]["cpu"]["median"]
        lines.append(f"  {key:<30} {w['median']:.2f} [{w['min']:.2f}, {w['max']:.2f}]  (cpu time {cpu:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lin_precision", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 timing repeats instead of 21")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"accuracy": accuracy(), "cost": cost(5 if args.quick else 21)}
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

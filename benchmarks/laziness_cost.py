"""What the two new laziness measures cost, against one training step, in one process (interleaved):

    python -m benchmarks.laziness_cost [--quick] [--repeats N]

- feature_change: `FeatureChange.measure` (two forwards of every branch, at θ_t and θ_0, on the
  first FEATURE_BATCH_SIZE probe sequences, plus CKA), which runs at every probe step; its amortized
  overhead when probing every k steps is 1 + (its time / step time) / k, on top of the probe step's.
- probe_step: the whole probe step (before_update + after_update, feature change included) for scale.
- linearized_model: one `BlockLinearizedModel.measure` (float64 CPU copy; model, fully linearized,
  frozen, and each block alone, on 4 held-out sequences), which runs only at its own few steps.
Shapes: `benchmarks.suite.BenchConfig` (the CPU targets' model: width 128, depth 4, 16 × 128 tokens,
probe batch 8); `--quick` uses the quick shape.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.suite import QUICK, BenchConfig, TrainerRunner, make_trainer
from benchmarks.timing import interleaved
from probes.adapters import GPTAdapter
from probes.linearized_model import DEFAULT_BATCH_SIZE, BlockLinearizedModel, model_loss
from probes.probe_log import FEATURE_BATCH_SIZE
from probes.session import ProbeSession


def measure(bench: BenchConfig, repeats: int) -> dict:
    torch.set_num_threads(bench.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = make_trainer(bench, bench.probe_param, Path(scratch))
        runner = TrainerRunner(trainer)
        device = trainer.device
        session = ProbeSession(GPTAdapter(trainer.eager_model), trainer.data.probe_batch(bench.probe_batch),
                               torch.float64 if device.type == "cpu" else torch.float32,
                               lin_batch_size=bench.lin_batch or None, feature_batch_size=FEATURE_BATCH_SIZE)
        theta0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        init_loss = model_loss(trainer.model, GPTAdapter, trainer.data.probe_batch(DEFAULT_BATCH_SIZE, 1))
        runner.run(bench.warmup_steps)
        session.before_update(trainer.step)  # acts and θ_t for the feature-change case
        pending = session._pending
        session.features.set_reference(theta0)
        held_out = trainer.data.probe_batch(DEFAULT_BATCH_SIZE, 1)

        def probe_step() -> None:
            step = trainer.step
            session.before_update(step)
            runner.run(1)
            session.after_update(step)

        cases = {
            "step": lambda: runner.run(1),
            "feature_change": lambda: session.features.measure(pending["acts"], pending["before"]),
            "probe_step": probe_step,
            "linearized_model": lambda: BlockLinearizedModel(GPTAdapter(trainer.model), theta0).measure(
                held_out, init_loss),
        }
        for case in cases.values():  # untimed warm-up (torch.func's first call)
            case()
        t = interleaved(cases, repeats, device)
    out = {name: t.ratio(name, "step") for name in ("feature_change", "probe_step", "linearized_model")}
    fc = out["feature_change"]["cpu"]["median"]
    out["feature_change_overhead"] = {f"k{k}": 1 + fc / k for k in (10, 100)}
    out["bench"] = {"width": bench.width, "depth": bench.depth, "seq_len": bench.seq_len,
                    "batch_size": bench.batch_size, "probe_batch": bench.probe_batch, "repeats": repeats}
    out["step_seconds_median"] = sorted(t.wall["step"])[len(t.wall["step"]) // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="The quick shape (width 64, depth 2).")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(json.dumps(measure(QUICK if args.quick else BenchConfig(), args.repeats), indent=2))


if __name__ == "__main__":
    main()

"""How much the linearization error moves when it is evaluated on fewer sequences of the probe batch.

The accuracy side of `ProbeConfig.lin_batch_size` (its cost side is in `python -m benchmarks`):

    python -m benchmarks.lin_subset RUN_DIR [RUN_DIR ...] [--json]

For each run dir (read only): the checkpoint's model and optimizer take one more update at the middle
of the LR schedule; its linearization ratio ‖nl‖/‖lin‖ per layer and branch is measured on the first
n ∈ {1, 2, 4, 8} sequences of the probe batch (float64) and compared with n = 8 as |log(r_n / r_8)|,
per layer and branch, and for the geometric mean over layers per branch (what `analyses.laziness`
fits against depth).
The per-sequence coefficient of variation says how much one sequence alone varies. Attention and MLP
act on each sequence alone, so the first n sequences give exactly the value those n would give alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.adapters import GPTAdapter
from probes.schema import BRANCHES
from probes.session import ProbeSession
from trainer import checkpoint as ckpt
from trainer.loop import RunSpec, Trainer

SIZES = (1, 2, 4, 8)


def lin_ratios(session: ProbeSession, pending: dict[str, Any], after: dict[str, torch.Tensor],
               rows: slice) -> np.ndarray:
    """lin_ratio[branch, layer] on the probe-batch sequences `rows`."""
    acts = {k: v[rows] for k, v in pending["acts"].items()}
    lin = session.linearization(acts, pending["before"], after)
    return np.array([[float(lin[(layer, b)].lin_ratio) for layer in range(session.adapter.depth)]
                     for b in BRANCHES])


def measure(run_dir: Path) -> dict[str, Any]:
    spec = RunSpec.from_dict(json.loads((run_dir / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as scratch:  # the run dir is only read
        trainer = Trainer(spec, Path(scratch), quiet=True)
        state = ckpt.load(run_dir / ckpt.CHECKPOINT_NAME, map_location=trainer.device)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        session = ProbeSession(GPTAdapter(trainer.model), trainer.data.probe_batch(max(SIZES)).to(trainer.device))
        step = spec.train.steps // 2  # mid-schedule learning rate: a typical update
        session.before_update(step)
        pending = session._pending
        trainer.train_step(step)
        after = {n: p.detach() for n, p in trainer.model.named_parameters()}
        by_size = {n: lin_ratios(session, pending, after, slice(0, n)) for n in SIZES}
        single = np.stack([lin_ratios(session, pending, after, slice(i, i + 1)) for i in range(max(SIZES))])
    full = by_size[max(SIZES)]
    out: dict[str, Any] = {"run": run_dir.name, "depth": spec.param.depth}
    for n in SIZES[:-1]:
        dev = np.abs(np.log(by_size[n] / full))
        geo = np.abs(np.log(by_size[n]).mean(1) - np.log(full).mean(1))
        out[f"n{n}"] = {"median_abs_log": float(np.median(dev)), "max_abs_log": float(dev.max()),
                        "layer_mean_abs_log": float(geo.max())}
    out["per_sequence_cv_median"] = float(np.median(single.std(0) / single.mean(0)))
    out["lin_ratio_first_last_layer"] = {b: [float(full[i, 0]), float(full[i, -1])] for i, b in enumerate(BRANCHES)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lin_subset", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run dirs with config.json and checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    for run in args.runs:
        if not (run / ckpt.CHECKPOINT_NAME).is_file():
            print(f"error: {run} has no {ckpt.CHECKPOINT_NAME}", file=sys.stderr)
            return 2
    results = [measure(run) for run in args.runs]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("|log(r_n / r_8)| of lin_ratio: median / max over layers and branches / of the mean over layers")
    for r in results:
        cols = "  ".join(f"n={n}: {r[f'n{n}']['median_abs_log']:.3f} / {r[f'n{n}']['max_abs_log']:.3f} / "
                         f"{r[f'n{n}']['layer_mean_abs_log']:.3f}"
                         for n in SIZES[:-1])
        print(f"{r['run']}  {cols}  per-sequence CV {r['per_sequence_cv_median']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

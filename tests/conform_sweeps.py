"""Tiny real sweeps (trained here, in-process) for the conformance tests: width 32-128, depth 2-8, 16 steps.

Why 16 steps: at 4 steps the per-update linearization ratio of the MLP at α = ½ is still in Adam's first,
sign-like transient (depth slope −0.93 against −0.5; −0.65 at 16 steps, −0.59 at 40): docs/EXPERIMENTS.md §5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probes.recorder import ProbeConfig
from trainer.loop import RunSpec, TrainConfig
from trainer.model import ModelConfig
from trainer.parameterization import Parameterization


def tiny_run(out: Path, param: str = "alpha", alpha: float = 1.0, depth: int = 2, width: int = 32, seed: int = 0,
             steps: int = 16, linearized: int = 0, **param_kw) -> Path:
    """Train one tiny run with probes at every step into `out` and return it."""
    from diagnose.cli import execute_run

    p = Parameterization(name=param, alpha=alpha, width=width, depth=depth, d_head=16, base_width=32, base_depth=2,
                         lr_base=2**-9, **param_kw)
    train = TrainConfig(steps=steps, batch_size=4, warmup_frac=0.0, schedule="constant", eval_every=steps,
                        eval_batches=1, eval_batch_size=2, checkpoint_every=steps, log_every=steps, seed=seed,
                        device="cpu")
    spec = RunSpec(param=p, model=ModelConfig(seq_len=32), train=train)
    probes = ProbeConfig(every=1, batch_size=2, linearized=linearized, lin_batch_size=2)
    torch.set_num_threads(1)
    execute_run(spec, probes, out, quiet=True)
    return out


def tiny_sweep(root: Path, depths=(2, 4, 8), widths=(32,), seeds=(0, 1), **kw) -> Path:
    """A sweep dir of tiny runs over depth × width × seed."""
    for depth in depths:
        for width in widths:
            for seed in seeds:
                tiny_run(root / f"d{depth}_w{width}_s{seed}", depth=depth, width=width, seed=seed, **kw)
    return root

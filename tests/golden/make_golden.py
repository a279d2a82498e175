"""Regenerate the golden records: `python -m tests.golden.make_golden` (then review the diff); with
`--numbers-only` only expected.json is recomputed from the committed sweep.zarr (an analyses change).

Trains a tiny fixed-seed depth sweep (α ∈ {0.5, 1}, depths 2/4/8, seeds 0/1) with the real trainer and
probes, stores the combined sweep Dataset as `sweep.zarr`, and the analysis numbers computed from it as
`expected.json`. tests/analyses/test_golden.py compares both against fresh computations, so an
unintended change of numerics (trainer, probes or analyses) fails loudly.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import xarray as xr

from analyses.coordcheck import depth_coord_check, slope_summary
from analyses.laziness import laziness
from analyses.load import open_sweep
from probes.recorder import ProbeConfig, ProbeRecorder
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig
from trainer.parameterization import Parameterization

HERE = Path(__file__).parent
ALPHAS, DEPTHS, SEEDS = (0.5, 1.0), (2, 4, 8), (0, 1)
KEEP = ("lin_ratio", "nonlin_to_output", "final_abs_mean", "final_rms", "act_rms", "delta0_rms", "train_loss")


def golden_spec(alpha: float, depth: int, seed: int) -> RunSpec:
    param = Parameterization(name="alpha", alpha=alpha, width=64, depth=depth, base_width=64, lr_base=2**-8)
    train = TrainConfig(steps=6, batch_size=4, seed=seed, warmup_frac=0.0, schedule="constant", eval_every=6,
                        eval_batches=1, eval_batch_size=4, checkpoint_every=6, log_every=6)
    return RunSpec(param=param, model=ModelConfig(seq_len=32), train=train)


def train_golden_run(out: Path, alpha: float, depth: int, seed: int) -> Path:
    spec = golden_spec(alpha, depth, seed)
    run_dir = out / f"a{alpha:g}_d{depth}_s{seed}"
    recorder = ProbeRecorder(ProbeConfig(every=1, batch_size=2, lin_batch_size=0), run_dir, spec)
    Trainer(spec, run_dir, observers=[recorder], quiet=True).run()
    return run_dir


def analysis_numbers(ds) -> dict:
    """The numbers the golden test pins: laziness slopes (with α̂ and intervals) and depth coord-check slopes."""
    table = laziness(ds)
    _, slopes = depth_coord_check(ds)
    summary = slope_summary(slopes)
    return {
        "laziness": [{k: (None if v != v else v) for k, v in row.items()} for row in
                     table[["param", "variable", "branch", "slope", "ci_low", "ci_high", "alpha_hat",
                            "verdict"]].to_dict("records")],
        "depth_coord": summary[["param", "init_slope", "trained_slope"]].to_dict("records"),
    }


def rewrite_numbers() -> None:
    """Recompute expected.json from the committed sweep.zarr (for an intended change of the analyses only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(HERE / "sweep.zarr").load()
    (HERE / "expected.json").write_text(json.dumps(analysis_numbers(ds), indent=1) + "\n")


def main() -> None:
    if "--numbers-only" in sys.argv[1:]:
        rewrite_numbers()
        return
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    try:
        for alpha in ALPHAS:
            for depth in DEPTHS:
                for seed in SEEDS:
                    train_golden_run(work, alpha, depth, seed)
        ds = open_sweep([work])[list(KEEP)].load()
        ds.attrs = {}
        for var in ds.variables.values():
            var.attrs, var.encoding = {}, {}
        shutil.rmtree(HERE / "sweep.zarr", ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.to_zarr(HERE / "sweep.zarr", mode="w-", consolidated=True)
        (HERE / "expected.json").write_text(json.dumps(analysis_numbers(ds), indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

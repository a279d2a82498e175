"""Regression tests on laziness metrics from real (small) training sweeps on the embedded corpus.

Every number below comes from runs trained here, in-process, with the real trainer and probes:
width 64 (base width 64), seq_len 64, batch 8, constant LR 2^-8, 8 steps, probes at every step on a
4-sequence held-out batch, float64 linearization.

Where the bands come from (measured 2026-11-27 on the 2-core CPU, seeds 0–2, depths 2–16):
- lin_ratio slope vs depth, α = 0.5: attn −0.45 [−0.49, −0.41], mlp −0.59 [−0.65, −0.54] (theory −0.5);
  α = 1: attn +0.11 [+0.08, +0.13], mlp −0.03 [−0.06, +0.01] (theory 0). The 95% bootstrap intervals
  over seeds are ±0.03–0.06 wide, and the two branches differ from theory by up to 0.11 at these
  small depths, so each band is the theory value ± 0.25 (twice the worst offset plus the
  seed-to-seed half-width), and the verdicts must be `lazy` and `complete`.
- final-stream size vs depth (Fig. 7), median log-log slope over steps ≥ 1: µP +0.93, α = 0.5 −0.13,
  α = 1 −0.07 (seed-averaged); bands: µP > 0.5 (grows ~linearly), α ∈ {0.5, 1}: |slope| < 0.3.
- width check at depth 2 (LR 2^-7, widths 64–256): act_rms slope of resid_post after step 0, SP +1.79,
  µP −0.13; bands: SP > 1.0, µP |slope| < 0.3.
"""

from __future__ import annotations

import pytest
import torch

from analyses.coordcheck import depth_coord_check, slope_summary, width_coord_check
from analyses.laziness import laziness, param_verdicts
from analyses.load import open_sweep
from probes.recorder import ProbeConfig, ProbeRecorder
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig
from trainer.parameterization import Parameterization

DEPTHS = (2, 4, 8, 16)
SEEDS = (0, 1, 2)


def train_tiny(out, name: str, alpha: float, width: int, depth: int, seed: int, lr: float) -> None:
    param = Parameterization(name=name, alpha=alpha, width=width, depth=depth, base_width=64, lr_base=lr)
    train = TrainConfig(steps=8, batch_size=8, seed=seed, warmup_frac=0.0, schedule="constant", eval_every=8,
                        eval_batches=1, eval_batch_size=8, checkpoint_every=8, log_every=8)
    spec = RunSpec(param=param, model=ModelConfig(seq_len=64), train=train)
    run_dir = out / f"{param.label}_w{width}_d{depth}_s{seed}"
    recorder = ProbeRecorder(ProbeConfig(every=1, batch_size=4), run_dir, spec)
    Trainer(spec, run_dir, observers=[recorder], quiet=True).run()


@pytest.fixture(scope="module")
def depth_sweep(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("depth_sweep")
    for name, alpha, seeds in (("alpha", 0.5, SEEDS), ("alpha", 1.0, SEEDS), ("mup", 1.0, SEEDS[:1])):
        for depth in DEPTHS:
            for seed in seeds:
                train_tiny(out, name, alpha, 64, depth, seed, 2**-8)
    return open_sweep([out])


@pytest.fixture(scope="module")
def width_sweep(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("width_sweep")
    for name in ("sp", "mup"):
        for width in (64, 128, 256):
            train_tiny(out, name, 1.0, width, 2, 0, 2**-7)
    return open_sweep([out])


def _slopes(table, label, variable="lin_ratio"):
    rows = table[(table.param == label) & (table.variable == variable)]
    return dict(zip(rows.branch, rows.itertuples()))


def test_completep_is_complete_and_depth_mup_is_lazy(depth_sweep):
    table = laziness(depth_sweep)
    for label, theory, verdict in (("alpha=0.5", -0.5, "lazy"), ("alpha=1", 0.0, "complete")):
        for branch, row in _slopes(table, label).items():
            assert abs(row.slope - theory) < 0.25, (label, branch, row.slope)
            assert row.ci_low <= row.slope <= row.ci_high
        # The verdict rests on the combined α̂ (docs/ESTIMATOR.md); the band is the lin_ratio one.
        for branch, row in _slopes(table, label, "combined").items():
            assert abs(row.alpha_hat - (1 + theory)) < 0.25, (label, branch, row.alpha_hat)
            assert row.alpha_hat_ci_low <= row.alpha_hat <= row.alpha_hat_ci_high
            assert row.verdict == verdict, (label, branch, row.reason)
    verdicts = dict(zip(param_verdicts(table).param, param_verdicts(table).verdict))
    assert verdicts["alpha=0.5"] == "lazy" and verdicts["alpha=1"] == "complete"
    assert verdicts["mup"] in ("not-lazy", "inconclusive")  # one µP seed; never called complete


def test_lazy_slope_is_clearly_below_complete_slope(depth_sweep):
    # The separation itself, per branch: α = 0.5 decays with depth at least 0.3 faster than α = 1.
    table = laziness(depth_sweep)
    lazy, complete = _slopes(table, "alpha=0.5"), _slopes(table, "alpha=1")
    for branch in lazy:
        assert lazy[branch].ci_high < complete[branch].ci_low
        assert complete[branch].slope - lazy[branch].slope > 0.3


def test_depth_coordinate_check(depth_sweep):
    _, slopes = depth_coord_check(depth_sweep)
    summary = slope_summary(slopes).set_index("param")
    assert summary.loc["mup", "trained_slope"] > 0.5  # SP/µP: the final stream grows with depth
    for label in ("alpha=0.5", "alpha=1"):
        assert abs(summary.loc[label, "trained_slope"]) < 0.3, label  # α-parameterizations stay flat
    # At init CompleteP's final stream shrinks with depth (blocks add L·L^-2 variance), α = 0.5 does not.
    assert summary.loc["alpha=1", "init_slope"] < summary.loc["alpha=0.5", "init_slope"]


def test_width_coordinate_check(width_sweep):
    _, slopes = width_coord_check(width_sweep, "act_rms")
    summary = slope_summary(slopes)
    stream = summary[summary.component == "resid_post"].set_index("param")
    assert stream.loc["sp", "trained_slope"] > 1.0  # SP: activations blow up with width
    assert abs(stream.loc["mup", "trained_slope"]) < 0.3  # µP: flat in width

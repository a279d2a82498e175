"""Depth and width coordinate checks: mean ± s.e. over seeds and slopes against planted exponents."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import coordcheck
from analyses.load import InsufficientSweepError, open_sweep
from probes import schema
from tests.analyses.conftest import (
    DEPTH_PARAMS,
    UPDATE_WIDTH_EXPONENT,
    WIDTH_EXPONENT,
    SynthRun,
    probe_dataset,
    write_sweep,
)


def test_depth_table_mean_and_sem_match_hand_computation(depth_ds):
    table, _ = coordcheck.depth_coord_check(depth_ds)
    row = table[(table.param == "sp") & (table.depth == 8) & (table.step == 4)]
    values = [float(probe_dataset(SynthRun(param="sp", depth=8, seed=s, depth_exponent=DEPTH_PARAMS["sp"][2],
                                           share_decay=0.3))["final_abs_mean"].sel(step=4)) for s in range(3)]
    assert row["mean"].item() == pytest.approx(np.mean(values), rel=1e-6)
    assert row["sem"].item() == pytest.approx(np.std(values, ddof=1) / np.sqrt(3), rel=1e-5)
    assert row["n_seeds"].item() == 3 and row["component"].item() == ""


def test_depth_slopes_recover_planted_exponents_per_step(depth_ds):
    _, slopes = coordcheck.depth_coord_check(depth_ds)
    assert set(slopes["step"]) == {0, 1, 2, 4, 8, 16}
    for _, r in slopes.iterrows():
        init, trained = DEPTH_PARAMS[r["param"]][2]
        assert r["slope"] == pytest.approx(init if r["step"] == 0 else trained, abs=0.06)
        assert r["n_points"] == 4
    summary = coordcheck.slope_summary(slopes).set_index("param")
    # Fig. 7's qualitative table: SP grows, α=0.5 flat, CompleteP shrinks at init then flat.
    assert summary.loc["sp", "trained_trend"] == "grows" and summary.loc["sp", "init_trend"] == "grows"
    assert summary.loc["alpha=0.5", "init_trend"] == "flat" and summary.loc["alpha=0.5", "trained_trend"] == "flat"
    assert summary.loc["alpha=1", "init_trend"] == "shrinks" and summary.loc["alpha=1", "trained_trend"] == "flat"


def test_final_rms_has_the_same_slopes(depth_ds):
    _, abs_slopes = coordcheck.depth_coord_check(depth_ds, "final_abs_mean")
    _, rms_slopes = coordcheck.depth_coord_check(depth_ds, "final_rms")
    np.testing.assert_allclose(abs_slopes["slope"], rms_slopes["slope"], atol=1e-6)  # planted rms = 1.25 * mean|x|


@pytest.mark.parametrize("variable", ["act_rms", "update_rms", "delta0_rms"])
def test_width_slopes_recover_planted_exponents(width_ds, variable):
    table, slopes = coordcheck.width_coord_check(width_ds, variable)
    assert (table["n_seeds"] == 2).all()
    finite = slopes.dropna(subset=["slope"])
    if variable == "delta0_rms":  # zero at step 0: no log, no slope
        assert set(finite["step"]) == {1, 2, 4}
    for _, r in finite.iterrows():
        if variable == "update_rms":
            planted = UPDATE_WIDTH_EXPONENT[r["param"]][schema.BLOCK_ROLES.index(r["component"])]
        else:
            planted = WIDTH_EXPONENT[r["param"]]
        assert r["slope"] == pytest.approx(planted, abs=0.08)
    summary = coordcheck.slope_summary(slopes)
    if variable == "update_rms":  # Table 1: under µP only the hidden weights' updates shrink with width
        mup = summary[summary.param == "mup"].set_index("component")["trained_trend"]
        assert mup.to_dict() == {"block_norm": "flat", "hidden_bias": "flat", "hidden_weight": "shrinks"}
        assert set(summary.loc[summary.param == "sp", "trained_trend"]) == {"flat"}
        return
    assert set(summary.loc[summary.param == "mup", "trained_trend"]) == {"flat"}
    assert set(summary.loc[summary.param == "sp", "trained_trend"]) == {"grows"}


def test_width_table_reduces_layers_by_rms(width_ds):
    table, _ = coordcheck.width_coord_check(width_ds, "act_rms")
    row = table[(table.param == "sp") & (table.width == 128) & (table.step == 2) & (table.component == "mlp_out")]
    per_seed = []
    for s in (0, 1):
        ds = probe_dataset(SynthRun(param="sp", depth=2, width=128, seed=s, width_exponent=0.5, steps=(0, 1, 2, 4)))
        per_seed.append(np.sqrt((ds["act_rms"].sel(step=2, site="mlp_out").values.astype(float) ** 2).mean()))
    assert row["mean"].item() == pytest.approx(np.mean(per_seed), rel=1e-6)


def test_slope_needs_two_values(width_ds):
    with pytest.raises(InsufficientSweepError, match="two or more depths"):
        coordcheck.depth_coord_check(width_ds, "act_rms")
    with pytest.raises(InsufficientSweepError, match="no final_abs_mean"):
        coordcheck.depth_coord_check(width_ds)
    with pytest.raises(ValueError, match="over must be"):
        coordcheck.scaling_table(width_ds, "act_rms", "lr")


def test_trend():
    assert coordcheck.trend(0.05) == "flat" and coordcheck.trend(-0.1) == "flat"
    assert coordcheck.trend(0.3) == "grows" and coordcheck.trend(-0.5) == "shrinks"
    assert coordcheck.trend(np.nan) == "n/a"


# --- the width check's physics on real runs --------------------------------------------------------------

REAL_WIDTHS, REAL_BASE_WIDTH, REAL_LR = (32, 64, 128), 32, 2.0**-7


@pytest.fixture(scope="module")
def real_width_sweep(tmp_path_factory):
    """Real tiny runs (µP at widths 32, 64, 128 and SP at 32, 128; depth 2, 16-wide heads), probed every step."""
    torch = pytest.importorskip("torch")
    from probes.recorder import ProbeConfig, ProbeRecorder
    from trainer.loop import RunSpec, TrainConfig, Trainer
    from trainer.model import ModelConfig
    from trainer.parameterization import Parameterization

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real_width")
    for name, widths in (("mup", REAL_WIDTHS), ("sp", REAL_WIDTHS[::2])):  # SP only as the flat contrast
        for width in widths:
            param = Parameterization(name=name, width=width, depth=2, base_width=REAL_BASE_WIDTH, d_head=16,
                                     lr_base=REAL_LR)
            train = TrainConfig(steps=3, batch_size=4, warmup_frac=0.0, schedule="constant", eval_every=3,
                                eval_batches=1, eval_batch_size=4, checkpoint_every=3, log_every=3)
            spec = RunSpec(param=param, model=ModelConfig(seq_len=32), train=train)
            run = root / f"{name}_w{width}"
            probes = ProbeRecorder(ProbeConfig(every=1, batch_size=2, lin_batch_size=1), run, spec)
            Trainer(spec, run, observers=[probes], quiet=True).run()
    return open_sweep(root)


def test_update_rms_in_width_follows_table1_on_real_runs(real_width_sweep):
    """Table 1: µP's hidden-weight LR is η_base · m_N^-1 and Adam moves each entry by about its LR, so
    the hidden weights' update RMS ∝ width^-1; block norms and biases (LR η_base) and every SP group
    stay flat. A parameterization or probe that lost the m_N^-1 gives a slope near 0 here."""
    table, slopes = coordcheck.width_coord_check(real_width_sweep, "update_rms")
    for _, r in slopes.iterrows():
        expected = -1.0 if (r["param"], r["component"]) == ("mup", "hidden_weight") else 0.0
        assert r["slope"] == pytest.approx(expected, abs=0.1), (r["param"], r["component"], r["step"])
    summary = coordcheck.slope_summary(slopes).set_index(["param", "component"])
    assert summary.loc[("mup", "hidden_weight"), "trained_trend"] == "shrinks"
    assert summary.loc[("sp", "hidden_weight"), "trained_trend"] == "flat"
    # Independent value: Adam's first step is lr · g/|g| per entry (ε ≪ |g|), so at step 0 the hidden
    # weights' update RMS is exactly their LR, η_base · m_N^-1 under µP.
    step0 = table[(table.param == "mup") & (table.step == 0) & (table.component == "hidden_weight")]
    for _, r in step0.iterrows():
        assert r["mean"] == pytest.approx(REAL_LR * REAL_BASE_WIDTH / r["width"], rel=1e-3)


# --- diverged seeds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged_sweep(tmp_path_factory):
    """α = 0.5 (flat in depth) at depths 2, 4, 8 with 3 seeds; seed 2 at depth 8 stops on a NaN at step 8."""
    root = tmp_path_factory.mktemp("diverged_sweep")
    keep = ("final_abs_mean", "final_rms")
    specs = [SynthRun(alpha=0.5, depth=d, seed=s, train_steps=16, val_every=None, blocks=1, variables=keep)
             for d in (2, 4, 8) for s in (0, 1, 2) if (d, s) != (8, 2)]
    # The trainer's NaN stop: loss NaN from step 8 on, status failed with bad_step 8, no probes after it.
    specs.append(SynthRun(alpha=0.5, depth=8, seed=2, train_steps=16, val_every=None, blocks=1, variables=keep,
                          final_loss=float("nan"), steps=(0, 1, 2, 4)))
    write_sweep(root, specs)
    return open_sweep(root)


def test_diverged_seeds_are_counted_and_never_flat(diverged_sweep):
    table, slopes = coordcheck.depth_coord_check(diverged_sweep)
    cell = table[table.depth == 8].set_index("step")
    assert cell.loc[4, "n_diverged"] == 0 and cell.loc[4, "n_seeds"] == 3
    assert cell.loc[8, "n_diverged"] == 1 and cell.loc[8, "n_seeds"] == 2
    assert cell.loc[16, "n_diverged"] == 1
    assert (table.loc[table.depth < 8, "n_diverged"] == 0).all()
    by_step = slopes.set_index("step")
    assert by_step.loc[4, "n_diverged"] == 0 and by_step.loc[16, "n_diverged"] == 1
    # The surviving seeds alone are flat in depth (the planted law); the check must not say so.
    assert abs(by_step.loc[16, "slope"]) <= coordcheck.FLAT_TOLERANCE
    summary = coordcheck.slope_summary(slopes).iloc[0]
    assert summary["trained_trend"] == "diverged" and summary["n_diverged"] == 1
    assert summary["init_trend"] == "flat"


def test_an_infinite_record_counts_as_diverged(diverged_sweep):
    ds = diverged_sweep.copy(deep=True)
    cell = dict(param="alpha=0.5", depth=4, seed=1, lr=ds.lr.values[0], width=64, step=16)
    ds["final_abs_mean"].loc[cell] = np.inf
    table, slopes = coordcheck.depth_coord_check(ds)
    row = table[(table.depth == 4) & (table.step == 16)]
    assert row["n_diverged"].item() == 1 and row["n_seeds"].item() == 2 and np.isfinite(row["mean"].item())
    assert table.loc[(table.depth == 4) & (table.step == 8), "n_diverged"].item() == 0


def test_trend_with_diverged_seeds():
    assert coordcheck.trend(0.0, n_diverged=1) == "diverged"
    assert coordcheck.trend(-0.5, n_diverged=2) == "diverged"
    assert coordcheck.trend(np.nan, n_diverged=1) == "diverged"
    assert coordcheck.trend(0.8, n_diverged=1) == "grows"  # already the unstable label
    assert coordcheck.trend(0.0, n_diverged=0) == "flat"

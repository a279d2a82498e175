"""Depth and width coordinate checks: mean ± s.e. over seeds and slopes against planted exponents."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import coordcheck
from analyses.load import InsufficientSweepError
from tests.analyses.conftest import DEPTH_PARAMS, WIDTH_EXPONENT, SynthRun, probe_dataset


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
        assert r["slope"] == pytest.approx(WIDTH_EXPONENT[r["param"]], abs=0.08)
    summary = coordcheck.slope_summary(slopes)
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

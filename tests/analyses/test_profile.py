"""Feature-learning profile: layer × step tables, shares of learning, concentration measures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import load, profile
from tests.analyses.conftest import SynthRun, probe_dataset


@pytest.mark.parametrize(
    ("shares", "entropy", "frac"),
    [
        ([0.25, 0.25, 0.25, 0.25], 1.0, 0.5),  # even: entropy 1, half the layers hold half
        ([1.0, 0.0, 0.0, 0.0], 0.0, 0.25),  # one layer holds everything
        ([0.5, 0.25, 0.25, 0.0], 0.75, 0.25),  # H = 1.5 ln2, / ln4 = 0.75; the first layer alone is half
        ([0.6, -0.2, 0.2, 0.2], (-0.6 * math.log(0.6) - 2 * 0.2 * math.log(0.2)) / math.log(4), 0.25),
        ([0.2, 0.3, np.nan, 0.1], (-(1 / 3) * math.log(1 / 3) - 0.5 * math.log(0.5) - (1 / 6) * math.log(1 / 6))
         / math.log(3), 1 / 3),
    ],
)
def test_concentration_hand_cases(shares, entropy, frac):
    got = profile.concentration(shares)
    assert got["entropy_norm"] == pytest.approx(entropy, abs=1e-12)
    assert got["frac_layers_50"] == pytest.approx(frac)


def test_concentration_degenerate():
    assert math.isnan(profile.concentration([-1.0, 0.0])["entropy_norm"])
    one = profile.concentration([0.9])
    assert one["frac_layers_50"] == 1.0 and math.isnan(one["entropy_norm"])


def test_layer_step_table_of_one_run(one_run):
    ds = load.open_run(one_run)
    table = profile.layer_step_table(ds, "delta0_rms", "attn_add")
    ref = probe_dataset(SynthRun(depth=4, share_decay=0.5))["delta0_rms"].sel(site="attn_add")
    assert table.shape == (4, 6) and table.columns.tolist() == [0, 1, 2, 4, 8, 16]
    np.testing.assert_allclose(table.to_numpy(), ref.values.T, rtol=1e-6)
    ratios = profile.layer_step_table(ds, "lin_ratio", "mlp")
    assert ratios.shape == (4, 6)
    tables = profile.feature_update_tables(ds)
    assert list(tables) == ["attn_add", "mlp_add", "resid_pre", "resid_mid", "resid_post"]
    assert tables["attn_add"].equals(table)


def test_layer_step_table_of_a_sweep_cell_averages_seeds_and_drops_padding(depth_ds):
    with pytest.raises(ValueError, match="varies param, depth"):
        profile.layer_step_table(depth_ds)
    table = profile.layer_step_table(depth_ds.sel(param="alpha=1", depth=4))
    assert table.shape == (4, 6)  # layers 4..15 were padding from the depth-16 runs
    seeds = [probe_dataset(SynthRun(depth=4, seed=s, depth_exponent=(-0.5, 0.0), share_decay=0.3))["delta0_rms"]
             .sel(site="mlp_add", step=8).values for s in range(3)]
    np.testing.assert_allclose(table[8].to_numpy(), np.mean(seeds, axis=0), rtol=1e-5)


def test_learning_shares_sum_to_one_with_embedding(one_run):
    shares = profile.learning_shares(load.open_run(one_run))
    assert shares.attrs["step"] == 16
    assert shares["share"].sum() + shares.attrs["embed_share"] == pytest.approx(1.0, rel=1e-6)
    assert shares["share"].is_monotonic_decreasing  # planted share_decay = 0.5


def test_concentration_table_over_the_sweep(depth_ds):
    table = profile.concentration_table(depth_ds)
    assert len(table) == 36 and (table["step"] == 16).all()
    # A fixed per-layer decay concentrates learning more, the deeper the model.
    deep = table.groupby("depth")["entropy_norm"].mean()
    assert deep.is_monotonic_decreasing and deep.loc[2] > 0.95
    row = table[(table.param == "sp") & (table.depth == 8) & (table.seed == 0)].iloc[0]
    expected = profile.concentration(0.9 * np.exp(-0.3 * np.arange(8)) / np.exp(-0.3 * np.arange(8)).sum())
    assert row["entropy_norm"] == pytest.approx(expected["entropy_norm"], rel=1e-5)
    assert row["embed_share"] == pytest.approx(0.1, rel=1e-6)
    assert profile.concentration_table(depth_ds, step=1)["step"].eq(1).all()

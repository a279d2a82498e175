"""Linearization-ratio slope vs depth: recovery of planted exponents, interval coverage, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analyses import laziness, load
from analyses.load import InsufficientSweepError
from tests.analyses.conftest import DEPTH_PARAMS, SynthRun, probe_dataset, write_sweep

PLANTED = {"sp": 0.0, "alpha=0.5": -0.5, "alpha=1": 0.0}


def _table(slope, depths=(2, 4, 8, 16), seeds=range(5), lrs=(1e-3,), sigma=0.1, rng=None, param="alpha=1"):
    """An in-memory ratio_table: value = c_lr * depth^slope * lognormal seed noise."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for i, lr in enumerate(lrs):
        for d in depths:
            for s in seeds:
                value = 0.01 * 10**i * d**slope * math.exp(sigma * rng.standard_normal())
                rows.append({"param": param, "alpha": 1.0, "depth": d, "width": 64, "seed": s, "lr": lr,
                             "branch": "mlp", "value": value, "n_points": 1})
    return pd.DataFrame(rows)


def test_ratio_table_is_geometric_mean_over_layers_and_window(depth_ds):
    spec = SynthRun(param="alpha", alpha=0.5, depth=8, seed=1, depth_exponent=DEPTH_PARAMS["alpha=0.5"][2],
                    share_decay=0.3)
    raw = probe_dataset(spec)["lin_ratio"]
    table = laziness.ratio_table(depth_ds)
    row = table[(table.param == "alpha=0.5") & (table.depth == 8) & (table.seed == 1) & (table.branch == "attn")]
    expected = np.exp(np.log(raw.sel(branch="attn").values[1:]).mean())  # steps >= 1, every layer
    assert row["value"].item() == pytest.approx(expected, rel=1e-9)
    assert row["n_points"].item() == 5 * 8
    whole = laziness.ratio_table(depth_ds, window=(0, None))
    row0 = whole[(whole.param == "alpha=0.5") & (whole.depth == 8) & (whole.seed == 1) & (whole.branch == "attn")]
    assert row0["value"].item() == pytest.approx(np.exp(np.log(raw.sel(branch="attn").values).mean()), rel=1e-9)


def test_slopes_recover_planted_exponents(depth_ds):
    res = laziness.laziness(depth_ds)
    lin = res[res.variable == "lin_ratio"]
    assert len(lin) == 6
    for _, r in lin.iterrows():
        planted = PLANTED[r["param"]]
        assert r["slope"] == pytest.approx(planted, abs=0.05)
        assert r["theory"] == planted
        assert r["ci_low"] - 0.02 <= planted <= r["ci_high"] + 0.02
        assert r["n_depths"] == 4 and r["min_seeds"] == 3 and r["depths"] == [2, 4, 8, 16]
    nl = res[res.variable == "nonlin_to_output"]
    for _, r in nl.iterrows():  # second order in the update: twice the exponent
        assert r["slope"] == pytest.approx(2 * PLANTED[r["param"]], abs=0.08)
        assert r["theory"] == 2 * PLANTED[r["param"]] and r["verdict"] == ""


def test_verdicts_for_planted_slopes(depth_ds):
    # sp's final stream grows with depth in this sweep (planted exponent 1 after step 0): not lazy,
    # but unstable; it is never called "complete".
    res = laziness.laziness(depth_ds)
    verdicts = laziness.param_verdicts(res, laziness.stream_trends(depth_ds)).set_index("param")
    assert verdicts["verdict"].to_dict() == {"sp": "not-lazy", "alpha=0.5": "lazy", "alpha=1": "complete"}
    assert verdicts["stability"].to_dict() == {"sp": "unstable", "alpha=0.5": "", "alpha=1": ""}
    assert laziness.expectation_met(verdicts.loc["sp"], "unstable")
    assert laziness.expectation_met(verdicts.loc["sp"], "not-lazy")
    assert not laziness.expectation_met(verdicts.loc["sp"], "complete")
    assert not laziness.expectation_met(verdicts.loc["alpha=1"], "unstable")


def test_alpha_hat_is_one_plus_the_slope_and_the_verdict_uses_the_combined_estimate(depth_ds):
    res = laziness.laziness(depth_ds)
    assert set(res["variable"]) == {"lin_ratio", "nonlin_to_output", "combined"}
    for _, r in res.iterrows():
        order = 2 if r["variable"] == "nonlin_to_output" else 1
        assert r["alpha_hat"] == pytest.approx(1 + r["slope"] / order, rel=1e-12)
        assert r["alpha_hat_ci_low"] == pytest.approx(1 + r["ci_low"] / order, rel=1e-12)
        assert r["alpha_hat_ci_high"] == pytest.approx(1 + r["ci_high"] / order, rel=1e-12)
        if r["param"].startswith("alpha="):
            assert r["alpha_hat"] == pytest.approx(float(r["param"].split("=")[1]), abs=0.05)
        assert (r["verdict"] != "") == (r["variable"] == "combined")
    # Independent recomputation of the combined value of one run: ½ log lin_ratio + ¼ log nonlin_to_output.
    lin, nl = laziness.ratio_table(depth_ds), laziness.ratio_table(depth_ds, "nonlin_to_output")
    both = laziness.combined_table(lin, nl)
    pick = dict(param="alpha=0.5", depth=8, seed=1, branch="mlp")
    row = {name: t.loc[np.logical_and.reduce([t[k] == v for k, v in pick.items()]), "value"].item()
           for name, t in (("lin", lin), ("nl", nl), ("both", both))}
    assert row["both"] == pytest.approx(row["lin"] ** 0.5 * row["nl"] ** 0.25, rel=1e-12)


def test_slope_matches_polyfit_of_depth_means():
    table = _table(-0.3, seeds=range(4))
    r = laziness.depth_slopes(table).iloc[0]
    means = table.assign(logv=np.log(table.value)).groupby("depth")["logv"].mean()
    assert r["slope"] == pytest.approx(np.polyfit(np.log(means.index), means.to_numpy(), 1)[0], rel=1e-12)


def test_pooled_slope_over_learning_rates():
    # Two LRs whose ratios differ tenfold: each gets its own intercept, the slope is shared.
    table = _table(-0.5, lrs=(1e-3, 4e-3), sigma=0.02)
    r = laziness.depth_slopes(table).iloc[0]
    assert r["slope"] == pytest.approx(-0.5, abs=0.02)
    assert r["ci_high"] - r["ci_low"] < 0.1 and r["n_runs"] == len(table)
    naive = np.polyfit(np.log(table.depth), np.log(table.value), 1)[0]
    assert r["slope"] == pytest.approx(naive, abs=0.02)  # balanced design: both agree here


def test_interval_of_one_group_does_not_depend_on_the_others():
    a = _table(-0.5, rng=np.random.default_rng(1))
    b = _table(0.0, rng=np.random.default_rng(2), param="alpha=0.5")
    both = laziness.depth_slopes(pd.concat([a, b])).set_index("param")
    alone = laziness.depth_slopes(a).set_index("param")
    for key in ("slope", "ci_low", "ci_high", "alpha_hat_ci_low"):
        assert both.loc["alpha=1", key] == alone.loc["alpha=1", key]


def test_single_seed_interval_comes_from_the_scatter_about_the_line():
    r = laziness.depth_slopes(_table(0.0, seeds=[0])).iloc[0]
    assert np.isfinite(r["slope"]) and r["min_seeds"] == 1 and r["df"] == 2
    assert r["ci_low"] < r["slope"] < r["ci_high"]
    two = laziness.depth_slopes(_table(0.0, depths=(2, 4), seeds=[0])).iloc[0]
    assert two["df"] == 0 and np.isnan(two["ci_low"])
    assert laziness.verdict(two["ci_low"], two["ci_high"])[0] == "inconclusive"


def test_pooled_slope_with_unbalanced_design_differs_from_naive_fit():
    # Two learning-rate cells whose ratios differ tenfold, at different depths and with different
    # seed counts: one line through all points is pulled by the offset between cells (the naive
    # slope even gets the sign wrong against a planted -0.5); the fixed-effects fit recovers it.
    rng = np.random.default_rng(5)
    small = _table(-0.5, depths=(2, 4, 8), seeds=range(4), lrs=(1e-3,), sigma=0.03, rng=rng)
    large = _table(-0.5, depths=(8, 16, 32), seeds=range(2), lrs=(1e-3, 4e-3), sigma=0.03, rng=rng)
    table = pd.concat([small, large[large.lr == 4e-3]], ignore_index=True)
    naive = np.polyfit(np.log(table.depth), np.log(table.value), 1)[0]
    r = laziness.depth_slopes(table).iloc[0]
    assert naive > 0.0
    assert r["slope"] == pytest.approx(-0.5, abs=0.04) and r["ci_low"] < -0.5 < r["ci_high"]
    # Independent check of the pooled estimate: subtract each cell's mean log-value and mean
    # log-depth, then one regression through the origin (the within-cell estimator).
    t = table.assign(x=np.log(table.depth), y=np.log(table.value))
    t["xc"] = t.x - t.groupby("lr").x.transform("mean")
    t["yc"] = t.y - t.groupby("lr").y.transform("mean")
    assert r["slope"] == pytest.approx((t.xc * t.yc).sum() / (t.xc**2).sum(), rel=1e-10)
    assert r["n_runs"] == len(table) and r["min_seeds"] == 2 and r["df"] == len(table) - 2 - 1


def test_local_slopes_are_differences_of_depth_means():
    table = _table(-0.3, depths=(2, 4, 8, 32), seeds=range(3), sigma=0.1)
    r = laziness.depth_slopes(table).iloc[0]
    means = table.assign(logv=np.log(table.value)).groupby("depth")["logv"].mean()
    expected = [(means[b] - means[a]) / math.log(b / a) for a, b in ((2, 4), (4, 8), (8, 32))]
    assert r["local_slopes"] == pytest.approx(expected, rel=1e-12)


def test_finite_depth_fit_recovers_slope_under_a_one_over_depth_correction():
    # A planted correction exp(a/L), a = 0.8 (the size measured at α = 1 with clipping): the plain
    # slope over depths 2–32 is biased by about -0.13, the finite-depth fit is not.
    rows = []
    rng = np.random.default_rng(9)
    for d in (2, 4, 8, 16, 32):
        for s in range(5):
            value = 0.01 * d**-0.25 * math.exp(0.8 / d + 0.02 * rng.standard_normal())
            rows.append({"param": "alpha=0.75", "alpha": 0.75, "depth": d, "width": 64, "seed": s, "lr": 1e-3,
                         "branch": "mlp", "value": value, "n_points": 1})
    r = laziness.depth_slopes(pd.DataFrame(rows)).iloc[0]
    assert r["slope"] < -0.25 - 0.08
    assert r["slope_fd"] == pytest.approx(-0.25, abs=0.03)
    assert r["slope_fd_ci_low"] < -0.25 < r["slope_fd_ci_high"]
    assert r["fd_term"] == pytest.approx(0.8, abs=0.15) and r["fd_term_ci_low"] > 0


# Seed-to-seed spread of log lin_ratio measured on real sweeps (docs/ESTIMATOR.md, "Seed-to-seed
# spread"): pooled within-depth standard deviation 0.03–0.11; per depth, from 2 seeds, 0.001–0.18
# (the uneven pattern below is the measured α = 1 mlp one). With equal noise the t interval's
# coverage does not depend on the noise size; the uneven pattern is what can break it.
MEASURED_SIGMA = 0.11
MEASURED_SIGMA_PER_DEPTH = {2: 0.03, 4: 0.15, 8: 0.07, 16: 0.04}


def _coverage(n_seeds: int, per_depth: dict[int, float], finite_depth: bool, trials: int = 1000) -> float:
    """Share of `trials` simulated sweeps whose 95% interval holds the planted slope (-0.3)."""
    rng = np.random.default_rng(1000 + n_seeds)
    depths = np.repeat(np.array(list(per_depth), dtype=float), n_seeds)
    sigma = np.repeat(np.array(list(per_depth.values())), n_seeds)
    truth = -0.3 * np.log(depths) + (0.8 / depths if finite_depth else 0.0)
    hits = 0
    for _ in range(trials):
        logv = truth + sigma * rng.standard_normal(depths.size)
        _, lo, hi, _ = laziness.fit_depth_slope(logv, depths, finite_depth=finite_depth)
        hits += lo <= -0.3 <= hi
    return hits / trials


def test_fit_depth_slope_is_what_depth_slopes_reports():
    table = _table(-0.3, seeds=range(3), sigma=0.09)
    r = laziness.depth_slopes(table).iloc[0]
    got = laziness.fit_depth_slope(np.log(table.value), table.depth, finite_depth=False)
    assert got == pytest.approx((r["slope"], r["ci_low"], r["ci_high"], r["df"]), rel=1e-12)
    got_fd = laziness.fit_depth_slope(np.log(table.value), table.depth, finite_depth=True)
    assert got_fd[:3] == pytest.approx((r["slope_fd"], r["slope_fd_ci_low"], r["slope_fd_ci_high"]), rel=1e-12)


@pytest.mark.parametrize("n_seeds", [2, 3, 5])
@pytest.mark.parametrize("finite_depth", [False, True])
def test_interval_coverage_at_the_measured_seed_spread(n_seeds, finite_depth):
    # Nominal 95%; required >= 93% at 3 and 5 seeds, >= 90% at 2 (1000 trials: binomial s.e. 0.7%).
    # The earlier percentile bootstrap covered 73% / 85% / 91% in this kind of test (issue 12).
    floor = 0.90 if n_seeds == 2 else 0.93
    even = _coverage(n_seeds, dict.fromkeys(MEASURED_SIGMA_PER_DEPTH, MEASURED_SIGMA), finite_depth)
    assert floor <= even <= 0.98  # exact under equal noise, and not trivially wide either
    if not finite_depth:  # the plain fit (the one α̂ uses) also holds with the measured uneven spread;
        # the finite-depth fit leans on the noisy second depth and covers 90-91% there (documented)
        assert _coverage(n_seeds, MEASURED_SIGMA_PER_DEPTH, finite_depth) >= floor


def test_one_depth_is_an_insufficient_sweep(depth_ds):
    with pytest.raises(InsufficientSweepError, match="two or more depths"):
        laziness.laziness(depth_ds.sel(depth=[4]))


@pytest.mark.parametrize(
    ("lo", "hi", "expected", "why"),
    [(-0.1, 0.1, "complete", "above"), (-0.6, -0.4, "lazy", "below"), (-0.3, -0.1, "inconclusive", "straddles"),
     (-0.15, 0.45, "inconclusive", "wider"), (-0.7, -0.25, "lazy", "below"), (np.nan, np.nan, "inconclusive", "no")],
)
def test_verdict_rule(lo, hi, expected, why):
    verdict, reason = laziness.verdict(lo, hi)
    assert verdict == expected and why in reason
    assert laziness.verdict(lo, hi, n_depths=3)[0] == expected


def test_shallow_grid_gives_no_verdict():
    verdict, reason = laziness.verdict(-0.1, 0.1, n_depths=3, depth_span=3.0)
    assert verdict == "inconclusive" and "too shallow" in reason and "3x" in reason
    assert laziness.verdict(-0.1, 0.1, n_depths=3, depth_span=4.0)[0] == "complete"


def test_two_depths_give_slopes_but_no_verdict(depth_ds):
    verdict, reason = laziness.verdict(-0.1, 0.1, n_depths=2)
    assert verdict == "inconclusive" and "needs 3" in reason
    res = laziness.laziness(depth_ds.sel(depth=[2, 16]))
    judged = res[res.variable == "combined"]
    assert np.isfinite(judged["ci_low"]).all() and (judged["n_depths"] == 2).all()
    assert set(judged["verdict"]) == {"inconclusive"}


def test_param_verdict_combines_branches():
    table = pd.DataFrame({"param": ["a", "a", "b", "b", "c", "c"], "variable": ["lin_ratio"] * 6,
                          "branch": ["attn", "mlp"] * 3,
                          "verdict": ["complete", "lazy", "complete", "complete", "complete", "inconclusive"],
                          "reason": ["r"] * 6})
    got = laziness.param_verdicts(table).set_index("param")["verdict"].to_dict()
    assert got == {"a": "lazy", "b": "complete", "c": "inconclusive"}


def test_theory_slope():
    assert laziness.theory_slope("alpha=0.5") == -0.5
    assert laziness.theory_slope("completep") == 0.0
    assert laziness.theory_slope("alpha=0.75", "nonlin_to_output") == -0.5
    assert laziness.theory_slope("mup") == 0.0


def test_single_run_dataset_works(one_run):
    table = laziness.ratio_table(load.open_run(one_run))
    assert len(table) == 2 and set(table.branch) == {"attn", "mlp"}


def test_ratio_table_uses_common_steps_and_leaves_out_unfinished_runs(tmp_path):
    keep = ("lin_ratio",)
    specs = [SynthRun(depth=d, seed=s, blocks=1, variables=keep) for d in (2, 4, 8) for s in (0, 1)]
    specs.append(SynthRun(depth=16, seed=0, steps=(0, 1, 2, 4, 8, 16, 32), blocks=1, variables=keep))
    specs.append(SynthRun(depth=16, seed=1, final_loss=math.nan, blocks=1, variables=keep))  # status: failed
    paths = write_sweep(tmp_path / "sweep", specs)
    table = laziness.ratio_table(load.open_sweep(tmp_path / "sweep"))
    assert table.attrs["steps"] == [1, 2, 4, 8, 16] and table.attrs["dropped_steps"] == [32]
    assert table.attrs["excluded"] == [f"{paths[-1]} (failed)"]
    assert len(table) == 2 * 7 and set(table[table.depth == 16]["seed"]) == {0}
    deep = table[(table.depth == 16) & (table.branch == "mlp")]
    raw = load.open_run(paths[-2])["lin_ratio"].sel(step=[1, 2, 4, 8, 16], branch="mlp").values
    assert deep["value"].item() == pytest.approx(np.exp(np.log(raw).mean()), rel=1e-9)  # step 32 left out
    assert deep["n_points"].item() == 5 * 16
    # The report says which runs were left out and which steps were used.
    res = laziness.laziness(load.open_sweep(tmp_path / "sweep"))
    assert res.attrs["excluded"] == table.attrs["excluded"] and res.attrs["steps"] == table.attrs["steps"]


def test_ratio_table_refuses_runs_with_no_common_step(tmp_path):
    keep = ("lin_ratio",)
    write_sweep(tmp_path / "s", [SynthRun(depth=2, steps=(0, 1, 2), blocks=1, variables=keep),
                                 SynthRun(depth=4, steps=(0, 5, 10), blocks=1, variables=keep)])
    with pytest.raises(InsufficientSweepError, match="share no probe step") as err:
        laziness.ratio_table(load.open_sweep(tmp_path / "s"))
    assert "a1_d2" in str(err.value) and "a1_d4" in str(err.value) and "\n" not in str(err.value)


def test_depth_slopes_accepts_the_bootstrap_arguments_of_earlier_callers():
    table = _table(-0.3, seeds=range(3))
    assert laziness.depth_slopes(table, n_boot=50, seed=3).equals(laziness.depth_slopes(table))

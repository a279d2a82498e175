"""Golden records: an unintended change of numerics in trainer, probes or analyses fails here.

tests/golden/sweep.zarr and expected.json were produced by `python -m tests.golden.make_golden`; rerun it
(and review the diff) only for an intended change.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.golden.make_golden import KEEP, analysis_numbers, train_golden_run

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.fixture(scope="module")
def golden():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(GOLDEN / "sweep.zarr").load()


def test_analyses_reproduce_the_committed_numbers(golden):
    expected = json.loads((GOLDEN / "expected.json").read_text())
    got = json.loads(json.dumps(analysis_numbers(golden)))
    for section in ("laziness", "depth_coord"):
        assert len(got[section]) == len(expected[section])
        for g, e in zip(got[section], expected[section]):
            for key, value in e.items():
                if isinstance(value, float):
                    assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (section, key, e)
                else:
                    assert g[key] == value


def test_a_fresh_run_reproduces_its_golden_records(golden, tmp_path):
    # Same CPU math, same seed: the records agree to float32 round-off (1e-5 relative allows for a
    # different BLAS or CPU; a changed formula or init moves them by far more).
    torch.set_num_threads(1)
    run_dir = train_golden_run(tmp_path, alpha=1.0, depth=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = xr.open_zarr(run_dir / "probes.zarr").load()
    ref = golden.sel(param="alpha=1", depth=4, seed=1).squeeze(drop=True)
    for name in KEEP:
        a = fresh[name].squeeze(drop=True).values
        b = ref[name].sel(layer=slice(0, 3)).values if "layer" in ref[name].dims else ref[name].values
        np.testing.assert_allclose(a, b.reshape(a.shape), rtol=1e-5, atol=1e-7, err_msg=name)


# --- each golden number once against an independent computation -----------------------------------------
# The two tests above pin the numbers; these say they are right, each by another route (numpy on the
# raw golden records, or theory), so a golden file regenerated from a wrong computation fails here.


def _run_values(golden, name: str, param: str, depth: int, seed: int) -> np.ndarray:
    """One run's records of `name` as a numpy array, layers above the run's depth cut off."""
    da = golden[name].sel(param=param, depth=depth, seed=seed).squeeze(drop=True)
    return (da.sel(layer=slice(0, depth - 1)) if "layer" in da.dims else da).values.astype(np.float64)


def test_laziness_slopes_equal_polyfit_on_the_raw_records(golden):
    """Independent: np.polyfit of log(per-run geometric mean over layers and steps ≥ 1) on log(depth).

    Every run of the golden sweep has the same steps and seeds at every depth (a balanced design), so
    the plain power-law slope over runs and over per-depth seed means are the same number. The
    interval is checked against np.polyfit's own standard error of that slope: it must bracket the
    slope and its half-width must be of the order of that SE (between 0.3 and 4 SEs)."""
    expected = json.loads((GOLDEN / "expected.json").read_text())["laziness"]
    for row in expected:
        if row["variable"] == "combined":  # a mix of the two: test_golden_numbers_match_an_independent_computation
            continue
        x, y = [], []
        for depth in golden.depth.values:
            for seed in golden.seed.values:
                values = _run_values(golden, row["variable"], row["param"], int(depth), int(seed))
                values = values[golden.step.values >= 1].take(golden.branch.values.tolist().index(row["branch"]),
                                                            axis=-1)
                x.append(np.log(depth))
                y.append(np.log(values).mean())
        slope = np.polyfit(x, y, 1)[0]
        assert row["slope"] == pytest.approx(slope, rel=1e-6, abs=1e-9), row
        fit = np.polyfit(x, y, 1, full=True)
        se = math.sqrt(fit[1][0] / (len(x) - 2) / np.sum((np.asarray(x) - np.mean(x)) ** 2))
        half = (row["ci_high"] - row["ci_low"]) / 2
        assert row["ci_low"] <= slope <= row["ci_high"], row
        assert 0.3 * se <= half <= 4 * se, (row, se)


def test_depth_coord_slopes_equal_polyfit_on_the_raw_records(golden):
    """Independent: per step, np.polyfit of log(seed mean of final_abs_mean) on log(depth); the
    trained slope is the median over steps ≥ 1."""
    expected = json.loads((GOLDEN / "expected.json").read_text())["depth_coord"]
    steps = golden.step.values
    for row in expected:
        means = np.array([[np.mean([_run_values(golden, "final_abs_mean", row["param"], int(d), int(s))[i]
                                    for s in golden.seed.values]) for d in golden.depth.values]
                          for i in range(len(steps))])  # (step, depth)
        slopes = [np.polyfit(np.log(golden.depth.values), np.log(means[i]), 1)[0] for i in range(len(steps))]
        assert row["init_slope"] == pytest.approx(slopes[0], rel=1e-6, abs=1e-9)
        assert row["trained_slope"] == pytest.approx(np.median(slopes[1:]), rel=1e-6, abs=1e-9)


def test_golden_records_agree_with_theory_and_with_each_other(golden):
    """Independent of the recorded formulas: (1) the final stream is the last block's resid_post, so
    final_rms (from the final hook) equals act_rms there (from the block hook); (2) nothing has moved
    at step 0, so delta0_rms is 0; (3) with small init (σ = 0.02, untied unembedding) the logits start
    near zero and the first training loss is near ln 256 (byte vocabulary); (4) RMS ≥ mean |x|."""
    for param in golden.param.values:
        for depth in golden.depth.values:
            for seed in golden.seed.values:
                act = _run_values(golden, "act_rms", param, int(depth), int(seed))
                final = _run_values(golden, "final_rms", param, int(depth), int(seed))
                sites = golden.site.values.tolist()
                np.testing.assert_allclose(final, act[:, -1, sites.index("resid_post")], rtol=1e-6)
                assert np.all(_run_values(golden, "delta0_rms", param, int(depth), int(seed))[0] == 0)
                loss0 = _run_values(golden, "train_loss", param, int(depth), int(seed))[0]
                assert abs(loss0 - math.log(256)) < 0.06
                assert np.all(final >= _run_values(golden, "final_abs_mean", param, int(depth), int(seed)))


def test_golden_numbers_match_an_independent_computation(golden):
    # Each committed number, once, against a recomputation that shares no code with analyses/: per run
    # the mean log-ratio over layers and steps ≥ 1 (plain numpy on the stored array), the slope by
    # np.polyfit over runs, its interval from the textbook simple-regression SE and the published
    # t quantile for df = 6 runs − 2 = 4 (2.776), α̂ = 1 + slope/k; the depth check as the slope of
    # log(seed-mean final |x|) vs log depth at step 0 and the median over steps ≥ 1.
    expected = json.loads((GOLDEN / "expected.json").read_text())
    t4 = 2.7764451
    depth = np.log(golden["depth"].values)
    logs = {}
    for var in ("lin_ratio", "nonlin_to_output"):
        arr = golden[var].values.astype(np.float64)[:, :, 0, :, 0, 1:]  # (param, depth, seed, step, layer, branch)
        arr = np.where(arr > 0, arr, np.nan)
        logs[var] = np.nanmean(np.log(arr), axis=(3, 4))  # (param, depth, seed, branch)
    logs["combined"] = 0.5 * logs["lin_ratio"] + 0.25 * logs["nonlin_to_output"]
    params, branches = list(golden["param"].values), list(golden["branch"].values)
    for e in expected["laziness"]:
        y = logs[e["variable"]][params.index(e["param"]), :, :, branches.index(e["branch"])]  # (depth, seed)
        x = np.repeat(depth, y.shape[1])
        slope, intercept = np.polyfit(x, y.ravel(), 1)
        rss = np.sum((y.ravel() - slope * x - intercept) ** 2)
        half = t4 * np.sqrt(rss / (x.size - 2) / np.sum((x - x.mean()) ** 2))
        order = 2 if e["variable"] == "nonlin_to_output" else 1
        assert e["slope"] == pytest.approx(slope, rel=1e-6), e
        assert (e["ci_low"], e["ci_high"]) == pytest.approx((slope - half, slope + half), rel=1e-5), e
        assert e["alpha_hat"] == pytest.approx(1 + slope / order, rel=1e-6), e
        if e["variable"] == "combined":  # verdict: complete above α̂ 0.8, lazy below (depths span 4x)
            lo, hi = 1 + slope - half, 1 + slope + half
            assert e["verdict"] == ("complete" if lo > 0.8 else "lazy" if hi < 0.8 else "inconclusive"), e
        else:
            assert e["verdict"] == ""
    final = golden["final_abs_mean"].values.astype(np.float64)[:, :, 0, :, 0, :]  # (param, depth, seed, step)
    for e in expected["depth_coord"]:
        seed_mean = final[params.index(e["param"])].mean(axis=1)  # (depth, step)
        per_step = [np.polyfit(depth, np.log(seed_mean[:, s]), 1)[0] for s in range(seed_mean.shape[1])]
        assert e["init_slope"] == pytest.approx(per_step[0], rel=1e-6)
        assert e["trained_slope"] == pytest.approx(float(np.median(per_step[1:])), rel=1e-6)

"""Each statistical formula against an independent computation (numpy polyfit, hand-worked cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import stats


def test_ols_and_loglog_slope_match_polyfit():
    rng = np.random.default_rng(0)
    x = np.array([2.0, 4, 8, 16, 32])
    y = 3.0 * x**-0.7 * np.exp(0.1 * rng.standard_normal(x.size))
    slope, intercept = stats.loglog_slope(x, y)
    ref = np.polyfit(np.log(x), np.log(y), 1)
    assert slope == pytest.approx(ref[0], rel=1e-12)
    assert intercept == pytest.approx(ref[1], rel=1e-12)
    # The slope does not depend on the log base.
    assert stats.ols_slope(np.log2(x), np.log2(y))[0] == pytest.approx(slope, rel=1e-12)


def test_slope_ignores_nonpositive_and_needs_two_x():
    assert stats.loglog_slope([2, 4, 8], [1.0, 0.0, 4.0])[0] == pytest.approx(1.0)  # (2,1), (8,4): slope 1
    assert math.isnan(stats.ols_slope([1, 1, 1], [1, 2, 3])[0])
    assert math.isnan(stats.ols_slope([1], [1])[0])


def test_geometric_mean_and_safe_log():
    assert stats.geometric_mean([1.0, 4.0, 16.0]) == pytest.approx(4.0)
    assert stats.geometric_mean([2.0, 0.0, np.nan, 8.0]) == pytest.approx(4.0)  # 0 and NaN left out
    assert math.isnan(stats.geometric_mean([0.0, -1.0]))
    assert np.isnan(stats.safe_log([0.0, -2.0, np.inf])).all()


def test_pooled_slope_one_cell_is_ols():
    x = np.log([2.0, 4, 8])
    y = np.array([0.3, -0.1, -0.4])
    (w,) = stats.pooled_slope_weights([x])
    assert np.dot(w, y) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)


def test_pooled_slope_fixed_effects_hand_case():
    # Two cells with the same slope 0.5 and very different intercepts: the pooled slope is exactly 0.5,
    # whereas one line through all points would be pulled by the offset.
    xa, xb = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0])
    ya, yb = 0.5 * xa + 10, 0.5 * xb - 10
    w = np.concatenate(stats.pooled_slope_weights([xa, xb]))
    assert np.dot(w, np.concatenate([ya, yb])) == pytest.approx(0.5, rel=1e-12)
    assert np.polyfit(np.concatenate([xa, xb]), np.concatenate([ya, yb]), 1)[0] != pytest.approx(0.5, abs=0.1)
    # A cell with one point carries no slope information.
    w1 = stats.pooled_slope_weights([xa, np.array([7.0])])
    assert np.all(w1[1] == 0)
    with pytest.raises(ValueError):
        stats.pooled_slope_weights([np.array([1.0]), np.array([2.0, 2.0])])


def test_bootstrap_means_and_percentile_interval():
    rng = np.random.default_rng(1)
    sample = np.array([1.0, 2.0, 3.0, 10.0])
    means = stats.bootstrap_means(sample, 4000, rng)
    assert means.shape == (4000,)
    assert means.mean() == pytest.approx(sample.mean(), rel=0.03)
    # Every resample mean lies between the smallest and largest value.
    assert means.min() >= 1.0 and means.max() <= 10.0
    lo, hi = stats.percentile_interval(means, 0.9)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [5, 95])))
    assert stats.percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 1.0) == (1.0, 3.0)


def test_sem():
    assert stats.sem([1.0, 2.0, 3.0]) == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(stats.sem([1.0]))


# --- t intervals and fixed-effects fits ------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13])
def test_student_t_cdf_matches_numerical_integration_of_the_density(df):
    # Independent computation: integrate the t density (gamma-function normalization) with a fine
    # trapezoid rule and compare with the closed-form series.
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    for t in (-3.0, -0.4, 0.0, 0.7, 2.5, 9.0):
        grid = np.linspace(0.0, abs(t), 200_001)
        dens = norm * (1 + grid**2 / df) ** (-(df + 1) / 2)
        half = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(grid)))
        expected = 0.5 + math.copysign(half, t)
        assert stats.student_t_cdf(t, df) == pytest.approx(expected, abs=1e-9)


def test_student_t_quantile_matches_published_table():
    # Two-sided 95% critical values from standard t tables.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 10: 2.228, 30: 2.042}
    for df, value in table.items():
        assert stats.student_t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert stats.student_t_quantile(0.025, 4) == pytest.approx(-2.776, abs=1e-3)
    with pytest.raises(ValueError):
        stats.student_t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        stats.student_t_cdf(1.0, 0)


def test_fixed_effects_fit_one_cell_matches_polyfit_and_textbook_se():
    rng = np.random.default_rng(3)
    x = np.repeat(np.log([2.0, 4, 8, 16]), 3)
    y = 0.2 - 0.4 * x + 0.1 * rng.standard_normal(x.size)
    coef, se, df = stats.fixed_effects_fit(y, x[:, None])
    slope, intercept = np.polyfit(x, y, 1)
    assert coef[0] == pytest.approx(slope, rel=1e-12) and df == x.size - 2
    # Textbook SE of a simple-regression slope: sqrt(RSS/(n-2) / Σ(x - x̄)²).
    rss = np.sum((y - (slope * x + intercept)) ** 2)
    assert se[0] == pytest.approx(math.sqrt(rss / (x.size - 2) / np.sum((x - x.mean()) ** 2)), rel=1e-10)
    lo, hi = stats.t_interval(coef[0], se[0], df)
    assert (hi - lo) / 2 == pytest.approx(stats.student_t_quantile(0.975, df) * se[0], rel=1e-12)
    assert np.isnan(stats.t_interval(1.0, np.nan, 3)[0]) and np.isnan(stats.t_interval(1.0, 0.1, 0)[1])


def test_fixed_effects_fit_matches_dummy_regression_and_extra_regressor():
    # Two cells with different intercepts and an extra shared regressor 1/L: the fit equals the
    # least-squares solution written out with explicit dummy columns (np.linalg.lstsq).
    rng = np.random.default_rng(4)
    depth = np.array([2.0, 4, 8, 16, 2, 4, 8, 16, 32])
    cells = np.array(["a"] * 4 + ["b"] * 5)
    y = np.where(cells == "a", 1.0, -3.0) - 0.3 * np.log(depth) + 0.8 / depth + 0.02 * rng.standard_normal(9)
    shared = np.column_stack([np.log(depth), 1 / depth])
    coef, se, df = stats.fixed_effects_fit(y, shared, cells)
    X = np.column_stack([(cells == "a").astype(float), (cells == "b").astype(float), shared])
    ref = np.linalg.lstsq(X, y, rcond=None)[0]
    assert coef == pytest.approx(ref[2:], rel=1e-10) and df == 9 - 4
    assert coef[0] == pytest.approx(-0.3, abs=0.05) and coef[1] == pytest.approx(0.8, abs=0.2)
    with pytest.raises(ValueError, match="not identified"):
        stats.fixed_effects_fit(np.array([1.0, 2.0]), np.array([[1.0], [2.0]]), np.array(["a", "b"]))

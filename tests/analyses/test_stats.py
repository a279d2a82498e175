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

"""Small numerical helpers shared by the analyses: log-log fits, pooled slopes, bootstrap, intervals.

Pure numpy (no scipy), each formula written out so that a test can check it against an independent
computation (`np.polyfit`, a hand-worked case).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

DEFAULT_N_BOOT = 1000
DEFAULT_CI = 0.95


def safe_log(values) -> np.ndarray:
    """Natural log of the positive finite entries; NaN elsewhere (zeros, negatives, NaN, inf).

    Ratios and RMS values are positive by construction; a zero means "below float precision" and
    cannot sit on a log axis, so it is left out rather than turned into -inf.
    """
    arr = np.asarray(values, dtype=np.float64)
    out = np.full(arr.shape, np.nan)
    ok = np.isfinite(arr) & (arr > 0)
    out[ok] = np.log(arr[ok])
    return out


def geometric_mean(values, axis=None) -> np.ndarray:
    """exp(mean(log x)) over the positive finite entries (NaN when there are none)."""
    logs = safe_log(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN slice gives NaN, as it should
        return np.exp(np.nanmean(logs, axis=axis))


def ols_slope(x, y) -> tuple[float, float]:
    """Least-squares line y ≈ slope·x + intercept over the finite pairs: (slope, intercept).

    NaN when fewer than two distinct x values remain.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.ptp(x) == 0:
        return np.nan, np.nan
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    return slope, float(y.mean() - slope * x.mean())


def loglog_slope(x, y) -> tuple[float, float]:
    """Slope and intercept of log(y) vs log(x) (natural logs; the slope does not depend on the base)."""
    return ols_slope(safe_log(x), safe_log(y))


def pooled_slope_weights(cells: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Weights w such that the pooled (fixed-effects) slope is Σ_c Σ_i w_ci · y_ci.

    `cells` holds, per cell c, the x values of its points. Each cell gets its own intercept and all
    share one slope; minimizing the squared error gives slope = Σ_c Σ_i (x_ci − x̄_c) y_ci / Σ_c Σ_i
    (x_ci − x̄_c)². With one cell this is the ordinary least-squares slope. Cells with a single point
    carry no information on the slope and get weight 0.
    """
    centred = [np.asarray(x, dtype=np.float64) - np.mean(x) for x in cells]
    denom = sum(float(np.dot(c, c)) for c in centred)
    if denom == 0:
        raise ValueError("no cell has two distinct x values: the slope is undetermined")
    return [c / denom for c in centred]


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement, same size) of a 1-D sample: shape (n_boot,)."""
    values = np.asarray(values, dtype=np.float64)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    return values[idx].mean(axis=1)


def percentile_interval(samples: np.ndarray, ci: float = DEFAULT_CI) -> tuple[float, float]:
    """Central percentile interval of bootstrap replicates (NaN replicates ignored)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return np.nan, np.nan
    lo, hi = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def sem(values) -> float:
    """Standard error of the mean over the finite entries (NaN with fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size >= 2 else np.nan

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


# --- least-squares fits with Student-t intervals -------------------------------------------------------


def student_t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer `df` ≥ 1 degrees of freedom (exact closed form).

    Uses the finite trigonometric series for P(|T| < t) with θ = atan(t/√df) (Abramowitz & Stegun
    26.7.3-4): for odd df, (2/π)(θ + sinθ cosθ Σ_k c_k cos^(2k)θ); for even df, sinθ Σ_k d_k cos^(2k)θ.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, not {df}")
    df = int(df)
    theta = np.arctan(abs(t) / np.sqrt(df))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    if df % 2:  # odd: terms 1, 2/3 c², (2·4)/(3·5) c⁴, ... up to cos^(df-3)
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inside = 2 / np.pi * (theta + (s * np.cos(theta) * total if df > 1 else 0.0))
    else:  # even: terms 1, 1/2 c², (1·3)/(2·4) c⁴, ... up to cos^(df-2)
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        inside = s * total
    return float(0.5 + np.sign(t) * inside / 2)


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer `df` (bisection on `student_t_cdf`, to 1e-10)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), not {p}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def fixed_effects_fit(
    y: np.ndarray, shared: np.ndarray, cells: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares y ≈ intercept[cell] + shared @ coef: (coef, standard errors of coef, residual df).

    `y` (n,) are the observations (one per run), `shared` (n, k) the regressors every cell shares
    (e.g. log depth), `cells` (n,) a label per observation: each cell gets its own intercept (all
    one cell when None). The standard errors are the classical ones, s²(XᵀX)⁻¹ with s² = RSS/df,
    df = n − (number of cells) − k: they count the spread of runs around the fitted line, so they
    include seed-to-seed noise and any lack of fit. NaN standard errors when df < 1; raises
    ValueError when the shared regressors are not identified (e.g. every cell has one distinct x).
    """
    y = np.asarray(y, dtype=np.float64)
    shared = np.asarray(shared, dtype=np.float64).reshape(len(y), -1)
    labels = np.zeros(len(y), dtype=int) if cells is None else np.unique(np.asarray(cells), return_inverse=True)[1]
    dummies = np.eye(labels.max() + 1)[labels]
    X = np.hstack([dummies, shared])
    k = shared.shape[1]
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError("the shared regressors are not identified by these points (too few distinct depths?)")
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = len(y) - X.shape[1]
    coef = beta[-k:]
    if df < 1:
        return coef, np.full(k, np.nan), df
    resid = y - X @ beta
    s2 = float(resid @ resid) / df
    cov = s2 * np.linalg.inv(X.T @ X)
    return coef, np.sqrt(np.diag(cov)[-k:]), df


def t_interval(estimate: float, se: float, df: int, ci: float = DEFAULT_CI) -> tuple[float, float]:
    """estimate ± t_{df, (1+ci)/2} · se; NaN when se is NaN or df < 1."""
    if not (np.isfinite(se) and df >= 1):
        return np.nan, np.nan
    half = student_t_quantile((1 + ci) / 2, df) * se
    return float(estimate - half), float(estimate + half)

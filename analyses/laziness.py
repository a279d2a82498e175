"""Laziness across α and depth: how the linearization ratio scales with depth, and a verdict.

For each branch of each block the probes record `lin_ratio` = ‖nl‖/‖lin‖, the size of the non-linear
part of the branch's response to its actual optimizer update relative to the linear (JVP) part
(spec §3.5). Theory (spec §3.2, D3): with branch multiplier L^-α and in-block LR ∝ L^(α-1), the ratio
scales as L^(α-1): slope -0.5 for depth-µP (α = 0.5), 0 for CompleteP (α = 1). A negative slope means
the deep blocks learn only through their linearization: they are *lazy*. SP and µP scale no LR with
depth, so their update per entry and hence their ratio do not depend on depth (theory slope 0): they
are not lazy, they are unstable, which the depth coordinate check shows. `nonlin_to_output` =
‖nl‖/‖F‖ is second order in the update and scales as L^(2(α-1)).

Method
1. Per run and branch: geometric mean of the ratio over layers and a step window (default: every
   probe step ≥ 1; the step-0 update is Adam's first, sign-like step taken at warm-up LR, which is not
   typical of training). A geometric mean because the ratio spans decades and the fit is in logs.
2. Per parameterization and branch: the least-squares slope of log(ratio) vs log(depth), fitted to
   the per-depth mean over seeds of the log-ratios. When the sweep also varies width or lr, each
   (width, lr) cell gets its own intercept and all share the slope (a fixed-effects fit), so
   verdicts use every run while lr-dependent offsets do not bias the slope.
3. Interval: percentile bootstrap over seeds (seeds resampled with replacement within each depth
   and cell, B = 1000 by default, a seeded numpy Generator per parameterization and branch).
4. Verdict from the interval (see `verdict`), given only with three or more depths.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import xarray as xr

from analyses import stats
from analyses.load import InsufficientSweepError, as_sweep, parse_param_label, sort_by_param

# Slope below which a parameterization counts as lazy. Theory gives 0 for complete and -0.5 for
# depth-µP; the threshold sits closer to 0 so that "complete" demands a slope interval excluding
# the decay of any α ≤ 0.8 (theory slope α − 1 ≤ −0.2), while the measured α = 1 slopes (−0.05 to
# +0.07 in the spec's re-implementation) clear it with room for finite-depth corrections.
LAZY_THRESHOLD = -0.2
# An interval wider than the gap between the two theory values (0 and −0.5) cannot tell α = 1 from
# α = 0.5 apart; a verdict resting on it would rest on noise (too few seeds or depths).
MAX_CI_WIDTH = 0.5
# Two depths always fit a line exactly: a power law needs a third depth before its slope can be
# trusted to describe the trend rather than two points.
MIN_DEPTHS_FOR_VERDICT = 3
DEFAULT_WINDOW: tuple[int | None, int | None] = (1, None)
VARIABLES: tuple[str, ...] = ("lin_ratio", "nonlin_to_output")
_THEORY_ORDER = {"lin_ratio": 1.0, "nonlin_to_output": 2.0}  # first vs second order in the update
_GROUP_KEYS = ("param", "branch")
_CELL_KEYS = ("width", "lr")


def theory_slope(label: str, variable: str = "lin_ratio") -> float:
    """Predicted log-log slope vs depth: (α − 1) for lin_ratio, 2(α − 1) for nonlin_to_output; 0 for sp/mup."""
    param, alpha = parse_param_label(label)
    order = _THEORY_ORDER[variable]
    return 0.0 if param in ("sp", "mup") else order * (alpha - 1.0)


def ratio_table(
    ds: xr.Dataset, variable: str = "lin_ratio", window: tuple[int | None, int | None] = DEFAULT_WINDOW
) -> pd.DataFrame:
    """Per run and branch: geometric mean of `variable` over layers and probe steps in `window`.

    `ds` is a sweep (`open_sweep`) or one run (`open_run`); `window` is (first, last) probe step,
    inclusive, None for open. Returns a tidy frame with columns param, alpha, depth, width, seed,
    lr, branch, value (dimensionless ratio), n_points (entries averaged; non-positive and
    non-finite ones are left out).
    """
    ds = as_sweep(ds)
    if variable not in ds:
        raise InsufficientSweepError(f"the records have no {variable} (linearization probe off?)")
    lo, hi = window
    da = ds[variable].sel(step=slice(lo, hi))
    logs = xr.apply_ufunc(stats.safe_log, da)
    frame = xr.Dataset(
        {"value": np.exp(logs.mean(("step", "layer"), skipna=True)), "n_points": logs.notnull().sum(("step", "layer"))}
    ).to_dataframe().reset_index()
    frame = frame[frame["n_points"] > 0]
    if frame.empty:
        raise InsufficientSweepError(
            f"no positive, finite {variable} values at probe steps {lo if lo is not None else 0} to "
            f"{hi if hi is not None else 'the end'} (too few probe steps recorded yet?)")
    cols = ["param", "alpha", "depth", "width", "seed", "lr", "branch", "value", "n_points"]
    return frame[cols].reset_index(drop=True)


def _group_rng(seed: int, key: tuple) -> np.random.Generator:
    # One generator per group, so a group's interval does not change when other groups are added.
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def depth_slopes(
    table: pd.DataFrame, n_boot: int = stats.DEFAULT_N_BOOT, seed: int = 0, ci: float = stats.DEFAULT_CI
) -> pd.DataFrame:
    """Log-log slope of `value` vs depth per (param, branch), with a bootstrap interval over seeds.

    `table` is `ratio_table`'s output (any frame with param, branch, width, lr, depth, seed, value).
    Returns one row per (param, branch): slope, ci_low, ci_high, n_depths, depths (list), min_seeds
    (fewest seeds at any depth; the interval is NaN below 2, since one seed shows no spread),
    n_runs. Raises InsufficientSweepError when the table has fewer than two depths.
    """
    if table.empty or table["depth"].nunique() < 2:
        depths = sorted(table["depth"].unique().tolist()) if not table.empty else []
        raise InsufficientSweepError(
            f"a slope vs depth needs runs at two or more depths; the sweep has depth {depths or 'none'}"
        )
    rows = []
    for key, group in table.groupby(list(_GROUP_KEYS), sort=False):
        # Points: one per (cell, depth), holding the log-values of its seeds.
        cells_x, cells_logs = [], []
        for _, cell in group.groupby(list(_CELL_KEYS)):
            xs, logs = [], []
            for depth, pts in cell.groupby("depth"):
                v = stats.safe_log(pts["value"].to_numpy())
                v = v[np.isfinite(v)]
                if v.size:
                    xs.append(math.log(depth))
                    logs.append(v)
            cells_x.append(np.asarray(xs))
            cells_logs.append(logs)
        depths = sorted(group["depth"].unique().tolist())
        min_seeds = min(len(v) for logs in cells_logs for v in logs)
        row = dict(zip(_GROUP_KEYS, key), alpha=group["alpha"].iloc[0], n_depths=len(depths),
                   depths=depths, min_seeds=min_seeds, n_runs=len(group))
        try:
            weights = np.concatenate(stats.pooled_slope_weights(cells_x))
        except ValueError:
            rows.append(row | {"slope": np.nan, "ci_low": np.nan, "ci_high": np.nan})
            continue
        flat = [v for logs in cells_logs for v in logs]
        slope = float(np.dot(weights, [v.mean() for v in flat]))
        lo = hi = np.nan
        if min_seeds >= 2:
            rng = _group_rng(seed, key)
            boot = np.stack([stats.bootstrap_means(v, n_boot, rng) for v in flat], axis=1)  # (B, points)
            lo, hi = stats.percentile_interval(boot @ weights, ci)
        rows.append(row | {"slope": slope, "ci_low": lo, "ci_high": hi})
    out = sort_by_param(pd.DataFrame(rows), "branch")
    cols = ["param", "alpha", "branch", "slope", "ci_low", "ci_high", "n_depths", "depths", "min_seeds", "n_runs"]
    return out[cols].reset_index(drop=True)


def verdict(ci_low: float, ci_high: float, n_depths: int | None = None) -> tuple[str, str]:
    """"complete", "lazy" or "inconclusive" from a slope interval, with the reason in words.

    complete: the whole interval lies above LAZY_THRESHOLD; lazy: the whole interval lies below it;
    inconclusive: it straddles the threshold, is wider than MAX_CI_WIDTH, is missing, or rests on
    fewer than MIN_DEPTHS_FOR_VERDICT depths (when `n_depths` is given).
    """
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "inconclusive", "no interval (needs two or more depths and two or more seeds at each depth)"
    span = f"slope interval [{ci_low:.3f}, {ci_high:.3f}]"
    if n_depths is not None and n_depths < MIN_DEPTHS_FOR_VERDICT:
        return "inconclusive", f"{span} rests on {n_depths} depths; a verdict needs {MIN_DEPTHS_FOR_VERDICT}"
    if ci_high - ci_low > MAX_CI_WIDTH:
        return "inconclusive", f"{span} is wider than {MAX_CI_WIDTH} (more seeds or depths needed)"
    if ci_low > LAZY_THRESHOLD:
        return "complete", f"{span} lies above the lazy threshold {LAZY_THRESHOLD}"
    if ci_high < LAZY_THRESHOLD:
        return "lazy", f"{span} lies below the lazy threshold {LAZY_THRESHOLD}"
    return "inconclusive", f"{span} straddles the lazy threshold {LAZY_THRESHOLD}"


def laziness(
    ds: xr.Dataset,
    window: tuple[int | None, int | None] = DEFAULT_WINDOW,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
    ci: float = stats.DEFAULT_CI,
) -> pd.DataFrame:
    """Slopes vs depth of lin_ratio and nonlin_to_output per (param, branch), with theory and verdict.

    Returns `depth_slopes` rows plus columns variable, theory, verdict and reason. The verdict is
    given for lin_ratio only (the quantity the threshold is calibrated for); nonlin_to_output rows
    carry verdict "" and serve as a cross-check (theory: twice the lin_ratio slope).
    """
    frames = []
    for variable in VARIABLES:
        if variable not in ds:
            continue
        slopes = depth_slopes(ratio_table(ds, variable, window), n_boot=n_boot, seed=seed, ci=ci)
        slopes.insert(2, "variable", variable)
        slopes["theory"] = [theory_slope(p, variable) for p in slopes["param"]]
        judged = [verdict(lo, hi, n) if variable == "lin_ratio" else ("", "")
                  for lo, hi, n in zip(slopes["ci_low"], slopes["ci_high"], slopes["n_depths"])]
        slopes["verdict"] = [v for v, _ in judged]
        slopes["reason"] = [r for _, r in judged]
        frames.append(slopes)
    if not frames:
        raise InsufficientSweepError("the records have no lin_ratio (linearization probe off?)")
    return pd.concat(frames, ignore_index=True)


def param_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One verdict per parameterization from `laziness` output, combining its branches.

    Complete feature learning needs every branch non-lazy (D3), so: "lazy" if any branch is lazy,
    "complete" if all are complete, otherwise "inconclusive". Columns: param, verdict, reason.
    """
    rows = []
    for param, group in table[table["variable"] == "lin_ratio"].groupby("param", sort=False):
        verdicts = dict(zip(group["branch"], group["verdict"]))
        if "lazy" in verdicts.values():
            v = "lazy"
        elif set(verdicts.values()) == {"complete"}:
            v = "complete"
        else:
            v = "inconclusive"
        reason = "; ".join(f"{b}: {r}" for b, r in zip(group["branch"], group["reason"]))
        rows.append({"param": param, "verdict": v, "reason": reason})
    return pd.DataFrame(rows, columns=["param", "verdict", "reason"])

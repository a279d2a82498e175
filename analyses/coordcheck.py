"""Coordinate checks: how activation and update sizes scale with depth (paper Fig. 7) and width (µP).

Depth check (spec §4.2): the final stream's mean |x| (`final_abs_mean`, also `final_rms`) per probe
step against depth. SP/µP grow with depth once training starts (about linearly); α = 0.5 stays flat;
CompleteP shrinks with depth at initialization and is flat afterwards. Our step 0 is the model at
initialization (the paper's "step 1").

Width check (spec §4.1): per-site activation RMS (`act_rms`, also `delta0_rms` and `update_rms`)
against width: flat under µP, growing under SP.

Both reduce to one computation: per (sweep cell, step) the mean ± standard error over seeds, then a
least-squares slope of log(mean) vs log(x) across the swept dim x. Slopes are judged with
`FLAT_TOLERANCE` rather than by eye.

Diverged seeds: a run that stopped on a non-finite loss (status `bad_step`) has no usable records
from that step on, and a record of ±inf is a divergence too. Averaging only the surviving seeds
would make an unstable parameterization look tamer (its largest activations are the ones that blew
up), so every table carries `n_diverged` (seeds of the cell diverged at or before the step) and a
curve with diverged seeds gets the trend "diverged" (never "flat"; "grows" stays "grows", which
already marks it unstable).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from analyses import stats
from analyses.load import SWEEP_DIMS, InsufficientSweepError, as_sweep, nan_stop_steps, sort_by_param

# |slope| at or below which a curve counts as flat. Over the 16-32x ranges of a typical sweep it
# allows a drift of at most 1.3-1.4x end to end, far from SP's growth (slope ~1 in depth after step 0,
# ~0.5-1 in width) and from CompleteP's init slope of about -0.5 in depth.
FLAT_TOLERANCE = 0.1
# Dims of a variable that are neither sweep dims, step nor layer: at most one per schema variable.
_COMPONENT_DIMS = ("site", "branch", "block_role", "global_role", "group")


def _component_dim(da: xr.DataArray) -> str | None:
    found = [d for d in da.dims if d in _COMPONENT_DIMS]
    return found[0] if found else None


def scaling_table(ds: xr.Dataset, variable: str, over: str) -> pd.DataFrame:
    """Mean ± s.e. over seeds of `variable` per sweep cell and probe step, ready to plot against `over`.

    Per-layer variables are first reduced to their RMS over layers (the size of the whole stack's
    activations, each layer weighted equally). Returns a tidy frame with columns param, alpha,
    depth, width, lr, step, component (site / role name, or "" for model-level variables), mean,
    sem (NaN with one seed), n_seeds (seeds averaged) and n_diverged (seeds whose run stopped on a
    non-finite loss at or before the step, or recorded ±inf there; left out of mean and sem).
    `over` ("depth" or "width") is only checked here.
    """
    ds = as_sweep(ds)
    if over not in ("depth", "width"):
        raise ValueError(f"over must be 'depth' or 'width', not {over!r}")
    if variable not in ds:
        raise InsufficientSweepError(f"the records have no {variable}")
    da = ds[variable].astype(np.float64)
    if "layer" in da.dims:
        da = np.sqrt((da**2).mean("layer", skipna=True))  # ±inf in any layer stays inf
    bad_step = nan_stop_steps(ds)
    diverged = np.isinf(da) | (da["step"] >= bad_step)  # NaN bad_step (no NaN stop) compares False
    da = da.where(np.isfinite(da) & ~diverged)
    n = da.notnull().sum("seed")
    n_diverged = diverged.sum("seed")
    mean = da.mean("seed", skipna=True)
    # Sample std with ddof=1 needs two seeds; xarray returns NaN (with a warning) otherwise.
    std = da.where(n >= 2).std("seed", skipna=True, ddof=1)
    frame = xr.Dataset({"mean": mean, "sem": std / np.sqrt(n), "n_seeds": n,
                        "n_diverged": n_diverged}).to_dataframe().reset_index()
    frame = frame[(frame["n_seeds"] > 0) | (frame["n_diverged"] > 0)]
    comp = _component_dim(da)
    frame["component"] = frame[comp].astype(str) if comp else ""
    cols = ["param", "alpha", "depth", "width", "lr", "step", "component", "mean", "sem", "n_seeds", "n_diverged"]
    frame = frame.astype({"n_seeds": "int64", "n_diverged": "int64"})
    return sort_by_param(frame[cols], "component", "depth", "width", "lr", "step")


def scaling_slopes(table: pd.DataFrame, over: str) -> pd.DataFrame:
    """Log-log slope of `mean` vs `over` per (param, other sweep dims, step, component).

    Returns columns param, alpha, the other sweep dims, step, component, slope, n_points (distinct
    values of `over` with a positive mean) and n_diverged (diverged seeds over all values of `over`
    at that step; the slope is over the surviving seeds only). Raises InsufficientSweepError when
    the table has fewer than two values of `over`.
    """
    if table.empty or table[over].nunique() < 2:
        values = sorted(table[over].unique().tolist()) if not table.empty else []
        raise InsufficientSweepError(f"a slope vs {over} needs two or more {over}s; the sweep has {values or 'none'}")
    keys = ["param", *[d for d in SWEEP_DIMS if d not in ("param", "seed", over)], "step", "component"]
    rows = []
    for key, group in table.groupby(keys, sort=False):
        ok = group["mean"] > 0
        slope, _ = stats.loglog_slope(group.loc[ok, over], group.loc[ok, "mean"])
        n_diverged = int(group["n_diverged"].sum()) if "n_diverged" in group else 0
        rows.append(dict(zip(keys, key), alpha=group["alpha"].iloc[0], slope=slope, n_points=int(ok.sum()),
                         n_diverged=n_diverged))
    out = pd.DataFrame(rows)
    return sort_by_param(out[["param", "alpha", *keys[1:], "slope", "n_points", "n_diverged"]], *keys[1:])


def depth_coord_check(ds: xr.Dataset, variable: str = "final_abs_mean") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 7: (table of mean ± s.e. per depth and step, slopes vs depth per step) for `variable`."""
    table = scaling_table(ds, variable, "depth")
    return table, scaling_slopes(table, "depth")


def width_coord_check(ds: xr.Dataset, variable: str = "act_rms") -> tuple[pd.DataFrame, pd.DataFrame]:
    """µP check: (table per width, step and site/role, slopes vs width) for `variable`."""
    table = scaling_table(ds, variable, "width")
    return table, scaling_slopes(table, "width")


def trend(slope: float, n_diverged: int = 0) -> str:
    """"flat", "grows" or "shrinks" by FLAT_TOLERANCE ("n/a" for NaN); "diverged" when seeds diverged.

    A slope over the seeds that survived says nothing about the ones that blew up, so a curve with
    diverged seeds is never called flat or shrinking: it is "diverged", unless the survivors already
    grow ("grows" is the unstable label, and survivors-only growth is a lower bound on it).
    """
    measured = "n/a" if not np.isfinite(slope) else (
        "flat" if abs(slope) <= FLAT_TOLERANCE else ("grows" if slope > 0 else "shrinks"))
    if n_diverged > 0 and measured != "grows":
        return "diverged"
    return measured


def slope_summary(slopes: pd.DataFrame) -> pd.DataFrame:
    """Condense per-step slopes: the slope at initialization (step 0) and the median over steps ≥ 1.

    Groups by every column except step, slope, n_points and n_diverged. Returns those keys plus
    init_slope, trained_slope (median of the per-step slopes after training starts, robust to one
    odd step), init_trend, trained_trend ("diverged" when seeds diverged at that stage, unless the
    survivors grow) and
    n_diverged (the most diverged seeds at any step: how many runs of the group blew up).
    """
    keys = [c for c in slopes.columns if c not in ("step", "slope", "n_points", "n_diverged", "alpha")]
    if "n_diverged" not in slopes:
        slopes = slopes.assign(n_diverged=0)
    rows = []
    for key, group in slopes.groupby(keys, sort=False):
        init = group.loc[group["step"] == 0, "slope"]
        trained = group.loc[group["step"] >= 1, "slope"].dropna()
        init_slope = float(init.iloc[0]) if len(init) else np.nan
        trained_slope = float(trained.median()) if len(trained) else np.nan
        init_div = int(group.loc[group["step"] == 0, "n_diverged"].max()) if len(init) else 0
        trained_div = int(group.loc[group["step"] >= 1, "n_diverged"].max()) if (group["step"] >= 1).any() else 0
        rows.append(dict(zip(keys, key), init_slope=init_slope, trained_slope=trained_slope,
                         init_trend=trend(init_slope, init_div), trained_trend=trend(trained_slope, trained_div),
                         n_diverged=max(init_div, trained_div)))
    return pd.DataFrame(rows)

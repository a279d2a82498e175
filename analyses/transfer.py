"""Hyperparameter transfer across depth: the optimal learning rate per depth and its drift.

The claim under test (spec §6): under CompleteP the optimal base LR η_base found at a small depth
stays optimal at large depth; under SP, µP and α = 0.5 it drifts. Inputs are each run's final loss
(`final_losses`, from metrics.jsonl, identity from the store attrs); `lr` is η_base, the LR before
the parameterization's per-group multipliers.

Method
- Final loss of a run (nats/token): the val_loss of its last validation when it has one, otherwise
  the mean train loss over the last 10% of its steps. A run that diverged (a non-finite loss in its
  metrics, or status "failed") counts as +inf; a run still running is left out of the fits.
- Optimum per (param, width, depth): average the seeds at each LR; an LR where any seed diverged is
  unusable (it sits at the edge of stability, so its mean would be +inf). Around the grid minimum
  take the `n_points` (3–5) usable LRs nearest in log2(lr), fit loss = a·x² + b·x + c with
  x = log2(lr), and take the vertex -b/(2a), clipped to the fitted points' range. If a ≤ 0 (no
  minimum) or fewer than 3 usable LRs, the grid minimum is used (method "grid"). `at_edge` flags
  an optimum at the first/last usable LR: the true optimum may lie outside the grid.
- Uncertainty: the same procedure on bootstrap replicates that resample seeds with replacement
  within each LR; percentile interval in log2(lr).
- Drift per (param, width): least-squares slope of log2(lr*) vs log2(depth); 0 means the optimum
  transfers, −1 means it halves with every doubling of depth. Its interval comes from the slopes of
  the bootstrap replicates (one replicate optimum per depth).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from analyses import stats
from analyses.load import (
    InsufficientSweepError,
    find_runs,
    list_runs,
    load_metrics,
    load_status,
    run_identity,
    sort_by_param,
)

LAST_FRACTION = 0.1  # share of the last steps whose train loss is averaged when a run has no validation
DEFAULT_FIT_POINTS = 5


def last_train_loss(metrics: pd.DataFrame) -> float:
    """Mean training loss over the last LAST_FRACTION of the steps that logged one (NaN if none)."""
    train = metrics["loss"].dropna()
    if train.empty:
        return math.nan
    return float(train.iloc[-max(1, math.ceil(LAST_FRACTION * len(train))):].mean())


def final_loss(run: str | os.PathLike) -> dict:
    """The final loss of one run dir: {loss, source ("val", "train" or "none"), state, diverged, last_step}.

    `loss` is +inf for a diverged run and NaN for a run without metrics.
    """
    metrics = load_metrics(run)
    state = str(load_status(run).get("state", "unknown"))
    if metrics.empty:
        return {"loss": math.nan, "source": "none", "state": state, "diverged": state == "failed", "last_step": -1}
    diverged = state == "failed" or bool(metrics.attrs.get("nonfinite_loss"))
    val = metrics["val_loss"].dropna()
    if len(val):
        loss, source = float(val.iloc[-1]), "val"
    else:
        loss, source = last_train_loss(metrics), "train"
    diverged = diverged or not math.isfinite(loss)
    return {"loss": math.inf if diverged else loss, "source": source, "state": state, "diverged": diverged,
            "last_step": int(metrics["step"].iloc[-1])}


def final_losses(runs: xr.Dataset | str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Final loss of every run: from a sweep Dataset (its `run_dir` variable) or run/sweep dirs.

    Returns columns param, alpha, depth, width, seed, lr, log2_lr, loss, source, state, diverged,
    usable (finished or failed, i.e. not still running and with a loss), last_step, run_dir.
    """
    ident_cols = ["param", "alpha", "depth", "width", "seed", "lr"]
    if isinstance(runs, xr.Dataset):
        rows = list_runs(runs)[[*ident_cols, "run_dir"]].to_dict("records")
    else:
        rows = []
        for path in find_runs(runs):
            ident = run_identity(path)
            rows.append({k: ident[k] for k in ident_cols} | {"run_dir": str(path)})
    out = []
    for row in rows:
        res = final_loss(row["run_dir"])
        usable = res["state"] != "running" and (res["diverged"] or math.isfinite(res["loss"]))
        out.append(row | res | {"log2_lr": math.log2(row["lr"]), "usable": usable})
    cols = ["param", "alpha", "depth", "width", "seed", "lr", "log2_lr", "loss", "source", "state", "diverged",
            "usable", "last_step", "run_dir"]
    return sort_by_param(pd.DataFrame(out, columns=cols), "width", "depth", "lr", "seed")


def _nearest(x: np.ndarray, i: int, n_points: int) -> np.ndarray:
    """Indices of the n_points entries of sorted `x` nearest to x[i] (ties: the lower LR)."""
    order = np.lexsort((np.arange(x.size), np.abs(x - x[i])))
    return np.sort(order[: min(n_points, x.size)])


def optimum_from_means(x: np.ndarray, means: np.ndarray, n_points: int = DEFAULT_FIT_POINTS) -> tuple[np.ndarray, str]:
    """Optimal x = log2(lr) for each row of `means` (shape (R, K), K usable LRs at sorted `x`).

    Returns (x_opt of shape (R,), method of the first row: "quadratic" or "grid"). Rows are
    grouped by their grid argmin so that each group is one batched least-squares solve.
    """
    means = np.atleast_2d(means)
    argmin = np.argmin(means, axis=1)
    x_opt = x[argmin].astype(np.float64)
    quadratic = np.zeros(len(means), dtype=bool)
    if x.size < 3:
        return x_opt, "grid"
    for i in np.unique(argmin):
        rows = np.flatnonzero(argmin == i)
        window = _nearest(x, int(i), max(3, n_points))
        xw = x[window]
        design = np.stack([xw**2, xw, np.ones_like(xw)], axis=1)  # (points, 3)
        coef, *_ = np.linalg.lstsq(design, means[np.ix_(rows, window)].T, rcond=None)  # (3, rows)
        a, b = coef[0], coef[1]
        ok = a > 0  # a parabola opening upward has a minimum; otherwise keep the grid minimum
        vertex = np.clip(-b[ok] / (2 * a[ok]), xw.min(), xw.max())
        x_opt[rows[ok]] = vertex
        quadratic[rows[ok]] = True
    return x_opt, "quadratic" if quadratic[0] else "grid"


def _rng(seed: int, key: tuple) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


@dataclass
class TransferResult:
    """Outputs of `lr_transfer`: per-run losses, per-depth optima and per-param drift (DataFrames)."""

    losses: pd.DataFrame
    optima: pd.DataFrame
    drift: pd.DataFrame
    boot: dict  # (param, width, depth) → bootstrap replicates of log2(lr*), shape (n_boot,) or None


def lr_transfer(
    losses: pd.DataFrame,
    n_points: int = DEFAULT_FIT_POINTS,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
    ci: float = stats.DEFAULT_CI,
) -> TransferResult:
    """Optimal LR per (param, width, depth) and its drift vs depth (see module doc).

    `losses` is `final_losses` output. optima columns: param, alpha, width, depth, lr_opt,
    log2_lr_opt, ci_low, ci_high (log2 lr), method, at_edge, best_loss (lowest seed-mean loss on
    the grid), best_lr_grid, n_lrs (usable), n_diverged (runs), min_seeds. drift columns: param,
    alpha, width, slope, ci_low, ci_high, n_depths, depths. Raises InsufficientSweepError when no
    (param, width, depth) has two or more LRs.
    """
    if losses.empty or losses.groupby(["param", "width", "depth"])["lr"].nunique().max() < 2:
        raise InsufficientSweepError("an optimal-LR fit needs runs at two or more learning rates")
    rows, boot = [], {}
    for key, group in losses[losses["usable"]].groupby(["param", "width", "depth"], sort=False):
        per_lr = {x: g["loss"].to_numpy(dtype=float) for x, g in group.groupby("log2_lr")}
        stable = {x: v for x, v in per_lr.items() if np.isfinite(v).all()}
        row = dict(zip(("param", "width", "depth"), key), alpha=group["alpha"].iloc[0], n_lrs=len(stable),
                   n_diverged=int(group["diverged"].sum()))
        if not stable:
            rows.append(row)
            boot[key] = None
            continue
        x = np.array(sorted(stable))
        samples = [stable[v] for v in x]
        means = np.array([s.mean() for s in samples])
        x_opt, method = optimum_from_means(x, means, n_points)
        i_best = int(np.argmin(means))
        min_seeds = min(s.size for s in samples)
        lo = hi = math.nan
        boot[key] = None
        if min_seeds >= 2:
            rng = _rng(seed, key)
            replicate_means = np.stack([stats.bootstrap_means(s, n_boot, rng) for s in samples], axis=1)
            boot[key], _ = optimum_from_means(x, replicate_means, n_points)
            lo, hi = stats.percentile_interval(boot[key], ci)
        rows.append(row | {
            "log2_lr_opt": float(x_opt[0]), "lr_opt": float(2.0 ** x_opt[0]), "ci_low": lo, "ci_high": hi,
            "method": method, "at_edge": i_best in (0, x.size - 1), "best_loss": float(means[i_best]),
            "best_lr_grid": float(2.0 ** x[i_best]), "min_seeds": min_seeds,
        })
    cols = ["param", "alpha", "width", "depth", "lr_opt", "log2_lr_opt", "ci_low", "ci_high", "method", "at_edge",
            "best_loss", "best_lr_grid", "n_lrs", "n_diverged", "min_seeds"]
    optima = sort_by_param(pd.DataFrame(rows).reindex(columns=cols), "width", "depth")
    return TransferResult(losses=losses, optima=optima, drift=_drift(optima, boot, ci), boot=boot)


def _drift(optima: pd.DataFrame, boot: dict, ci: float) -> pd.DataFrame:
    rows = []
    for (param, width), group in optima.dropna(subset=["log2_lr_opt"]).groupby(["param", "width"], sort=False):
        logd = np.log2(group["depth"].to_numpy(dtype=float))
        slope, _ = stats.ols_slope(logd, group["log2_lr_opt"])
        lo = hi = math.nan
        reps = [boot.get((param, width, d)) for d in group["depth"]]
        if len(group) >= 2 and all(r is not None for r in reps):
            # Slope of each replicate's optima against depth: the same closed form, vectorized.
            xc = logd - logd.mean()
            slopes = np.stack(reps, axis=1) @ xc / np.dot(xc, xc)
            lo, hi = stats.percentile_interval(slopes, ci)
        rows.append({"param": param, "alpha": group["alpha"].iloc[0], "width": width, "slope": slope,
                     "ci_low": lo, "ci_high": hi, "n_depths": len(group), "depths": group["depth"].tolist()})
    cols = ["param", "alpha", "width", "slope", "ci_low", "ci_high", "n_depths", "depths"]
    return pd.DataFrame(rows, columns=cols)

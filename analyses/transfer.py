"""Hyperparameter transfer across depth: the optimal learning rate per depth and its drift.

The claim under test (spec §6): under CompleteP the optimal base LR η_base found at a small depth
stays optimal at large depth; under SP, µP and α = 0.5 it drifts. Inputs are each run's final loss
(`final_losses`, from metrics.jsonl, identity from the store attrs); `lr` is η_base, the LR before
the parameterization's per-group multipliers.

Method
- Final loss of a run (nats/token): the val_loss of its last validation when it has one, otherwise
  the mean train loss over the last 10% of its steps.
- Diverged vs missing: a run *diverged* when training stopped on a non-finite loss (status.json
  has the trainer's `bad_step`) or its metrics hold a non-finite training loss; its loss is +inf.
  A run that failed otherwise (killed, out of memory, a crash: no `bad_step`) is *missing*: it says
  nothing about the LR's stability, so it is left out like a run still running, not counted as
  divergence (which would push η* down).
- Optimum per (param, width, depth): average the seeds at each LR; an LR where any seed diverged is
  unusable (it sits at the edge of stability, so its mean would be +inf). Around the grid minimum
  take the `n_points` (3–5) usable LRs nearest in log2(lr), fit loss = a·x² + b·x + c with
  x = log2(lr), and take the vertex -b/(2a), clipped to the fitted points' range. If a ≤ 0 (no
  minimum) or fewer than 3 usable LRs, the grid minimum is used (method "grid"). `at_edge` flags
  an optimum at the first/last usable LR: the true optimum may lie outside the grid.
- Uncertainty: a seed shares its init and data order across LRs, so the losses of one seed at
  different LRs are correlated (a lucky seed is lucky at every LR). Bootstrap replicates therefore
  resample *seeds* with replacement, jointly for all LRs of a (param, width, depth), and redo the
  optimum on each replicate's per-LR means; percentile interval in log2(lr). Resampling each LR's
  seeds independently would treat a seed's shared offset as LR-to-LR noise and widen the interval.
  A seed missing at some LR contributes to the other LRs only; a replicate whose drawn seeds all
  miss one LR uses that LR's full-sample mean there.
- Drift per (param, width): least-squares slope of log2(lr*) vs log2(depth) over the depths whose
  optimum is inside the grid; depths with `at_edge` optima are left out (a clipped optimum is a
  bound, not an estimate) and listed in `edge_depths`. 0 means the optimum transfers, −1 means it
  halves with every doubling of depth. Its interval comes from the slopes of the bootstrap
  replicates (one replicate optimum per depth).
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
    """The final loss of one run dir: {loss, source ("val", "train" or "none"), state, diverged, missing,
    last_step}.

    `diverged`: stopped on a non-finite loss (status `bad_step`, or a non-finite loss in the metrics);
    `loss` is then +inf. `missing`: not running, and failed without diverging (killed, out of memory,
    a crash) or without a loss; `loss` is then NaN and the run is left out of the fits.
    """
    metrics = load_metrics(run)
    status = load_status(run)
    state = str(status.get("state", "unknown"))
    nan_stop = state == "failed" and status.get("bad_step") is not None
    if metrics.empty:
        return {"loss": math.inf if nan_stop else math.nan, "source": "none", "state": state,
                "diverged": nan_stop, "missing": not nan_stop and state != "running", "last_step": -1}
    diverged = nan_stop or bool(metrics.attrs.get("nonfinite_loss"))
    val = metrics["val_loss"].dropna()
    if len(val):
        loss, source = float(val.iloc[-1]), "val"
    else:
        loss, source = last_train_loss(metrics), "train"
    # A crash stops a run early at a finite loss that belongs to no LR comparison.
    missing = not diverged and state != "running" and (state == "failed" or not math.isfinite(loss))
    loss = math.inf if diverged else (math.nan if missing else loss)
    return {"loss": loss, "source": source, "state": state, "diverged": diverged, "missing": missing,
            "last_step": int(metrics["step"].iloc[-1])}


def final_losses(runs: xr.Dataset | str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Final loss of every run: from a sweep Dataset (its `run_dir` variable) or run/sweep dirs.

    Returns columns param, alpha, depth, width, seed, lr, log2_lr, loss, source, state, diverged,
    missing (crashed without diverging), usable (diverged, or finished with a finite loss: not
    running, not missing), last_step, run_dir.
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
        usable = res["state"] != "running" and not res["missing"] and (res["diverged"] or math.isfinite(res["loss"]))
        out.append(row | res | {"log2_lr": math.log2(row["lr"]), "usable": usable})
    cols = ["param", "alpha", "depth", "width", "seed", "lr", "log2_lr", "loss", "source", "state", "diverged",
            "missing", "usable", "last_step", "run_dir"]
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


def joint_seed_bootstrap(table: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Per-LR means of `n_boot` replicates that resample seeds (rows) jointly across LRs (columns).

    `table` is (seeds, LRs) of finite losses, NaN where a seed has no run at that LR. Each replicate
    draws `seeds` row indices with replacement, the same rows for every LR, and averages each
    column over the drawn rows present there; a column none of whose drawn rows is present gets the
    full-sample column mean. Returns shape (n_boot, LRs).
    """
    table = np.asarray(table, dtype=np.float64)
    present = np.isfinite(table)
    values = np.where(present, table, 0.0)
    idx = rng.integers(0, table.shape[0], size=(n_boot, table.shape[0]))
    sums = values[idx].sum(axis=1)  # (n_boot, LRs)
    counts = present[idx].sum(axis=1)
    full = np.nanmean(table, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), full[None, :])


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

    `losses` is `final_losses` output (a `missing` column is optional; without it no run counts as
    missing). optima columns: param, alpha, width, depth, lr_opt, log2_lr_opt, ci_low, ci_high
    (log2 lr), method, at_edge, best_loss (lowest seed-mean loss on the grid), best_lr_grid, n_lrs
    (usable), n_diverged (runs), n_missing (crashed runs, left out), min_seeds (fewest seeds at a
    usable LR), n_seeds (distinct seeds at the usable LRs). drift columns: param, alpha, width,
    slope, ci_low, ci_high, n_depths (used in the fit), depths, edge_depths (left out: optimum at
    the grid edge). Raises InsufficientSweepError when no (param, width, depth) has two or more LRs.
    """
    if losses.empty or losses.groupby(["param", "width", "depth"])["lr"].nunique().max() < 2:
        raise InsufficientSweepError("an optimal-LR fit needs runs at two or more learning rates")
    missing = losses["missing"] if "missing" in losses else pd.Series(False, index=losses.index)
    n_missing = losses[missing.astype(bool)].groupby(["param", "width", "depth"]).size()
    rows, boot = [], {}
    for key, group in losses[losses["usable"]].groupby(["param", "width", "depth"], sort=False):
        # (seed × LR) table: a seed is one init and data order, shared by all its LRs.
        table = group.pivot_table(index="seed", columns="log2_lr", values="loss", aggfunc="first", dropna=False)
        stable = [x for x in table.columns if np.isinf(table[x]).sum() == 0 and table[x].notna().any()]
        row = dict(zip(("param", "width", "depth"), key), alpha=group["alpha"].iloc[0], n_lrs=len(stable),
                   n_diverged=int(group["diverged"].sum()), n_missing=int(n_missing.get(key, 0)))
        if not stable:
            rows.append(row)
            boot[key] = None
            continue
        x = np.array(sorted(stable), dtype=np.float64)
        sub = table[sorted(stable)].dropna(how="all").to_numpy(dtype=np.float64)  # (seeds, LRs)
        counts = np.isfinite(sub).sum(axis=0)
        means = np.nanmean(sub, axis=0)
        x_opt, method = optimum_from_means(x, means, n_points)
        i_best = int(np.argmin(means))
        lo = hi = math.nan
        boot[key] = None
        if sub.shape[0] >= 2:
            replicate_means = joint_seed_bootstrap(sub, n_boot, _rng(seed, key))
            boot[key], _ = optimum_from_means(x, replicate_means, n_points)
            lo, hi = stats.percentile_interval(boot[key], ci)
        rows.append(row | {
            "log2_lr_opt": float(x_opt[0]), "lr_opt": float(2.0 ** x_opt[0]), "ci_low": lo, "ci_high": hi,
            "method": method, "at_edge": i_best in (0, x.size - 1), "best_loss": float(means[i_best]),
            "best_lr_grid": float(2.0 ** x[i_best]), "min_seeds": int(counts.min()), "n_seeds": int(sub.shape[0]),
        })
    cols = ["param", "alpha", "width", "depth", "lr_opt", "log2_lr_opt", "ci_low", "ci_high", "method", "at_edge",
            "best_loss", "best_lr_grid", "n_lrs", "n_diverged", "n_missing", "min_seeds", "n_seeds"]
    optima = sort_by_param(pd.DataFrame(rows).reindex(columns=cols), "width", "depth")
    return TransferResult(losses=losses, optima=optima, drift=_drift(optima, boot, ci), boot=boot)


def _drift(optima: pd.DataFrame, boot: dict, ci: float) -> pd.DataFrame:
    rows = []
    for (param, width), all_depths in optima.dropna(subset=["log2_lr_opt"]).groupby(["param", "width"], sort=False):
        edge = all_depths["at_edge"].astype(bool)
        group = all_depths[~edge]  # an optimum clipped to the grid's edge is a bound, not an estimate
        row = {"param": param, "alpha": all_depths["alpha"].iloc[0], "width": width, "slope": math.nan,
               "ci_low": math.nan, "ci_high": math.nan, "n_depths": len(group), "depths": group["depth"].tolist(),
               "edge_depths": all_depths.loc[edge, "depth"].tolist()}
        if len(group):
            logd = np.log2(group["depth"].to_numpy(dtype=float))
            row["slope"], _ = stats.ols_slope(logd, group["log2_lr_opt"])
            reps = [boot.get((param, width, d)) for d in group["depth"]]
            if len(group) >= 2 and all(r is not None for r in reps):
                # Slope of each replicate's optima against depth: the same closed form, vectorized.
                xc = logd - logd.mean()
                slopes = np.stack(reps, axis=1) @ xc / np.dot(xc, xc)
                row["ci_low"], row["ci_high"] = stats.percentile_interval(slopes, ci)
        rows.append(row)
    cols = ["param", "alpha", "width", "slope", "ci_low", "ci_high", "n_depths", "depths", "edge_depths"]
    return pd.DataFrame(rows, columns=cols)

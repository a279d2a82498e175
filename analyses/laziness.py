"""Laziness across α and depth: how the linearization ratio scales with depth, an estimate of the
depth exponent α, and a verdict.

For each branch of each block the probes record `lin_ratio` = ‖nl‖/‖lin‖, the size of the non-linear
part of the branch's response to its actual optimizer update relative to the linear (JVP) part
(spec §3.5). Theory (spec §3.2, D3): with branch multiplier L^-α and in-block LR ∝ L^(α-1), the ratio
scales as L^(α-1): slope -0.5 for depth-µP (α = 0.5), 0 for CompleteP (α = 1). A negative slope means
the deep blocks learn only through their linearization: they are *lazy*. SP and µP scale no LR with
depth, so their update per entry and hence their ratio do not depend on depth (theory slope 0): they
are not lazy; whether they are stable is the depth coordinate check's question, so they get the
verdict "not-lazy" (never "complete"), with "unstable" beside it when their final stream grows with
depth. `nonlin_to_output` = ‖nl‖/‖F‖ is second order in the update and scales as L^(2(α-1)).

Method (docs/ESTIMATOR.md has the evidence behind each choice)
1. Per run and branch: geometric mean of the ratio over layers and the probe steps in a window
   (default: steps ≥ 1; step 0 is Adam's first, sign-like step at warm-up LR). Only finished runs
   enter, and only the probe steps that every one of them recorded: the ratio is proportional to
   the step's LR factor, so runs averaged over different parts of the schedule are not comparable.
2. Per parameterization and branch, a least-squares fit over runs of log(value) against log(depth),
   each (width, lr) cell with its own intercept (a fixed-effects fit): `slope`. Shown beside it:
   `local_slopes` between consecutive depths, and `slope_fd` from log r = c + s·log L + a/L, the
   finite-depth correction that gradient clipping produced at α = 1 (a ≈ 0.7); it is not used for α̂
   (3.5x wider interval on four depths, a not significant on unclipped sweeps).
3. Interval: Student-t, slope ± t_{df} · SE with the classical least-squares SE over runs
   (df = runs − cells − regressors), so it widens honestly with few seeds (t_{0.975} is 2.8 at
   df 4) and counts any lack of fit of the power law. Its coverage on planted slopes with the
   measured seed-to-seed spread is tested at 2, 3 and 5 seeds.
4. α̂ = 1 + slope/k (k = 1 for lin_ratio, 2 for nonlin_to_output). The verdict's α̂ comes from the
   "combined" value ½·log lin_ratio + ¼·log nonlin_to_output per run (theory: slope α − 1): at
   α < 1 the first ratio falls faster than theory and the second slower, at every depth measured.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from analyses import coordcheck, stats, theory
from analyses.load import InsufficientSweepError, as_sweep, parse_param_label, sort_by_param

# Slope below which a parameterization counts as lazy (α̂ below 1 + LAZY_THRESHOLD = 0.8). Theory
# gives 0 for complete and -0.5 for depth-µP; "complete" demands an interval that excludes the decay
# of any α ≤ 0.8.
LAZY_THRESHOLD = -0.2
# An interval wider than the gap between the two theory values (0 and −0.5) cannot tell α = 1 from
# α = 0.5 apart; a verdict resting on it would rest on noise (too few seeds or depths).
MAX_CI_WIDTH = 0.5
# Two depths always fit a line exactly: a power law needs a third depth before its slope can be
# trusted to describe the trend rather than two points.
MIN_DEPTHS_FOR_VERDICT = 3
# Deepest over shallowest depth below which a grid is too shallow for a verdict: over less than 4x the
# ratios of α = 1 and α = 0.5 part by less than 2x end to end, while the slope between consecutive
# doublings near the base depth moves by up to 0.3 (docs/ESTIMATOR.md).
MIN_DEPTH_SPAN = 4.0
# The finite-depth fit has three parameters per cell; with four depths or more its slope is
# over-determined by the depth means, below that it is not estimated.
MIN_DEPTHS_FOR_FD = 4
DEFAULT_WINDOW: tuple[int | None, int | None] = (1, None)
VARIABLES: tuple[str, ...] = ("lin_ratio", "nonlin_to_output")
# Run states whose records are complete; "unknown" is an in-memory Dataset with no status.json.
USABLE_STATES = ("finished", "unknown")
VERDICTS = ("complete", "lazy", "inconclusive", "not-lazy", "unstable")
# First vs second order in the update; "combined" is ½·lin_ratio + ¼·nonlin_to_output in logs.
_THEORY_ORDER = {"lin_ratio": 1.0, "nonlin_to_output": 2.0, "combined": 1.0}
_GROUP_KEYS = ("param", "branch")
_CELL_KEYS = ("width", "lr")


def theory_slope(label: str, variable: str = "lin_ratio") -> float:
    """Predicted log-log slope vs depth, from the one theory table (analyses.theory): (α − 1) for
    lin_ratio and the combined ratio, 2(α − 1) for nonlin_to_output; 0 for sp/mup."""
    param, alpha = parse_param_label(label)
    quantity = "lin_ratio" if variable == "combined" else variable
    return theory.predicted_exponent(param, alpha, quantity, "depth")


def _run_name(row) -> str:
    return str(row.get("run_dir") or f"{row['param']} L={row['depth']} N={row['width']} seed={row['seed']}")


def ratio_table(
    ds: xr.Dataset, variable: str = "lin_ratio", window: tuple[int | None, int | None] = DEFAULT_WINDOW
) -> pd.DataFrame:
    """Per run and branch: geometric mean of `variable` over layers and the common probe steps in `window`.

    `ds` is a sweep (`open_sweep`) or one run (`open_run`); `window` is (first, last) probe step,
    inclusive, None for open. Runs whose state (status.json) is not finished are left out, and only
    the probe steps that every remaining run recorded in the window are averaged. Returns a tidy
    frame with columns param, alpha, depth, width, seed, lr, branch, value (dimensionless ratio),
    n_points (entries averaged; non-positive and non-finite ones are left out); attrs["steps"]
    holds the steps used, attrs["excluded"] the left-out runs as "run_dir (state)" and
    attrs["dropped_steps"] the steps some runs had beyond the common ones. Raises
    InsufficientSweepError when nothing usable remains, naming the runs whose steps differ.
    """
    ds = as_sweep(ds)
    if variable not in ds:
        raise InsufficientSweepError(f"the records have no {variable} (linearization probe off?)")
    lo, hi = window
    logs = xr.apply_ufunc(stats.safe_log, ds[variable].sel(step=slice(lo, hi)))
    has = logs.notnull().any(("layer", "branch"))  # (sweep dims..., step): the run recorded this step
    runs = has.any("step").to_dataframe(name="has").reset_index()
    runs = runs[runs["has"]].drop(columns="has")
    for extra in ("state", "run_dir"):
        if extra in ds:
            runs = runs.merge(ds[extra].to_dataframe().reset_index()[[*has.dims[:-1], extra]], how="left")
    state = runs["state"] if "state" in runs else pd.Series("unknown", index=runs.index)
    usable = state.isin(USABLE_STATES).to_numpy()
    excluded = [f"{_run_name(r)} ({r['state']})" for _, r in runs[~usable].iterrows()]
    runs = runs[usable]
    span = f"probe steps {lo if lo is not None else 0} to {hi if hi is not None else 'the end'}"
    if runs.empty:
        why = f"; left out: {', '.join(excluded)}" if excluded else ""
        raise InsufficientSweepError(f"no finished run has positive, finite {variable} values at {span}{why}")
    dims = list(has.dims[:-1])
    steps_of = {}
    for _, r in runs.iterrows():
        recorded = has.sel({d: r[d] for d in dims}).to_series()
        steps_of[_run_name(r)] = frozenset(int(s) for s in recorded.index[recorded.to_numpy()])
    common = sorted(frozenset.intersection(*steps_of.values()))
    if not common:
        groups: dict[frozenset, list[str]] = {}
        for name, steps in steps_of.items():
            groups.setdefault(steps, []).append(name)
        shown = "; ".join(f"{', '.join(sorted(n)[:3])}{' …' if len(n) > 3 else ''}: steps {sorted(s)}"
                          for s, n in groups.items())
        raise InsufficientSweepError(f"the runs share no probe step in {span}, so their ratios are not comparable: "
                                     f"{shown}")
    dropped = sorted(frozenset.union(*steps_of.values()) - set(common))
    used = logs.sel(step=common)
    frame = xr.Dataset(
        {"value": np.exp(used.mean(("step", "layer"), skipna=True)), "n_points": used.notnull().sum(("step", "layer"))}
    ).to_dataframe().reset_index()
    frame = frame.merge(runs[dims], how="inner")
    frame = frame[frame["n_points"] > 0]
    cols = ["param", "alpha", "depth", "width", "seed", "lr", "branch", "value", "n_points"]
    out = frame[cols].reset_index(drop=True)
    out.attrs.update(steps=common, excluded=excluded, dropped_steps=dropped)
    return out


def local_slopes(table: pd.DataFrame) -> list[float]:
    """Slopes of the mean log-value between consecutive depths, averaged over (width, lr) cells.

    `table` holds one (param, branch). Entry i is the slope from the i-th to the (i+1)-th depth of
    the table (NaN where no cell has both).
    """
    logv = stats.safe_log(table["value"].to_numpy())
    cell = table.groupby(list(_CELL_KEYS), sort=False).ngroup().to_numpy()
    depth = table["depth"].to_numpy()
    depths = np.unique(depth)
    means = np.full((cell.max() + 1, depths.size), np.nan)
    for c in range(cell.max() + 1):
        for j, d in enumerate(depths):
            v = logv[(cell == c) & (depth == d)]
            v = v[np.isfinite(v)]
            if v.size:
                means[c, j] = v.mean()
    out = []
    for j in range(depths.size - 1):
        diffs = (means[:, j + 1] - means[:, j]) / math.log(depths[j + 1] / depths[j])
        diffs = diffs[np.isfinite(diffs)]
        out.append(float(diffs.mean()) if diffs.size else math.nan)
    return out


def fit_depth_slope(
    logv: np.ndarray, depth: np.ndarray, cells: np.ndarray | None = None, finite_depth: bool = False,
    ci: float = stats.DEFAULT_CI,
) -> tuple[float, float, float, int]:
    """(slope, ci_low, ci_high, df) of log-values vs log(depth), one point per run.

    `logv` (n,) natural logs of the runs' ratios (NaN entries are left out), `depth` (n,) their
    depths, `cells` (n,) labels of (width, lr) cells, each with its own intercept. With
    `finite_depth` the fit has the extra term a/L. NaN slope when the depths cannot identify it.
    """
    return _fit(logv, depth, cells, finite_depth, ci)[0]


def _fit(logv, depth, cells, finite_depth: bool, ci: float) -> tuple[tuple[float, float, float, int], tuple]:
    """((slope, lo, hi, df), (a, a_lo, a_hi)): the slope and, with `finite_depth`, the a/L coefficient."""
    nan = (math.nan, math.nan, math.nan)
    logv = np.asarray(logv, dtype=np.float64)
    ok = np.isfinite(logv)
    depth = np.asarray(depth, dtype=np.float64)[ok]
    shared = np.column_stack([np.log(depth), 1.0 / depth] if finite_depth else [np.log(depth)])
    try:
        coef, se, df = stats.fixed_effects_fit(logv[ok], shared, None if cells is None else np.asarray(cells)[ok])
    except ValueError:
        return (*nan, 0), nan
    lo, hi = stats.t_interval(coef[0], se[0], df, ci)
    term = (float(coef[1]), *stats.t_interval(coef[1], se[1], df, ci)) if finite_depth else nan
    return (float(coef[0]), lo, hi, df), term


def depth_slopes(
    table: pd.DataFrame,
    ci: float = stats.DEFAULT_CI,
    variable: str = "lin_ratio",
    n_boot: int | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Slope of log `value` vs log depth per (param, branch), plain and finite-depth corrected, with α̂.

    `table` is `ratio_table`'s output (any frame with param, alpha, branch, width, lr, depth, seed,
    value) for `variable`. Returns one row per (param, branch): slope, ci_low, ci_high (plain fit);
    slope_fd, slope_fd_ci_low, slope_fd_ci_high and the a/L coefficient fd_term with its interval
    (finite-depth fit; NaN below MIN_DEPTHS_FOR_FD depths); local_slopes (list); alpha_hat,
    alpha_hat_ci_low, alpha_hat_ci_high (1 + slope/k from the plain fit, k the variable's order);
    n_depths, depths (list), min_seeds (fewest seeds at any depth), n_runs, df (residual degrees of
    freedom of the plain fit). Intervals are NaN when the fit leaves no degrees of freedom.
    `n_boot` and `seed` belonged to the earlier bootstrap interval and have no effect (kept so that
    callers written for it, e.g. the conformance and laziness-measure fits, keep working).
    Raises InsufficientSweepError when the table has fewer than two depths.
    """
    if table.empty or table["depth"].nunique() < 2:
        depths = sorted(table["depth"].unique().tolist()) if not table.empty else []
        raise InsufficientSweepError(
            f"a slope vs depth needs runs at two or more depths; the sweep has depth {depths or 'none'}"
        )
    order = _THEORY_ORDER[variable]
    rows = []
    for key, group in table.groupby(list(_GROUP_KEYS), sort=False):
        depths = sorted(group["depth"].unique().tolist())
        seeds_at = group.groupby([*_CELL_KEYS, "depth"])["seed"].nunique()
        logv = stats.safe_log(group["value"].to_numpy())
        cells = group.groupby(list(_CELL_KEYS), sort=False).ngroup().to_numpy()
        (slope, lo, hi, df), _ = _fit(logv, group["depth"].to_numpy(), cells, False, ci)
        fd, term = (math.nan, math.nan, math.nan, 0), (math.nan, math.nan, math.nan)
        if len(depths) >= MIN_DEPTHS_FOR_FD:
            fd, term = _fit(logv, group["depth"].to_numpy(), cells, True, ci)
        # The finite-depth fit is shown beside the plain one, not used for α̂: its interval is 3.5x
        # wider on four depths, and without clipping the bend it models is not significant on real
        # sweeps (docs/ESTIMATOR.md).
        rows.append(dict(zip(_GROUP_KEYS, key)) | {
            "alpha": group["alpha"].iloc[0], "slope": slope, "ci_low": lo, "ci_high": hi,
            "slope_fd": fd[0], "slope_fd_ci_low": fd[1], "slope_fd_ci_high": fd[2], "fd_term": term[0],
            "fd_term_ci_low": term[1], "fd_term_ci_high": term[2],
            "local_slopes": local_slopes(group), "alpha_hat": 1 + slope / order,
            "alpha_hat_ci_low": 1 + lo / order, "alpha_hat_ci_high": 1 + hi / order, "n_depths": len(depths),
            "depths": depths, "min_seeds": int(seeds_at.min()), "n_runs": len(group), "df": df})
    out = sort_by_param(pd.DataFrame(rows), "branch")
    cols = ["param", "alpha", "branch", "slope", "ci_low", "ci_high", "slope_fd", "slope_fd_ci_low",
            "slope_fd_ci_high", "fd_term", "fd_term_ci_low", "fd_term_ci_high", "local_slopes", "alpha_hat",
            "alpha_hat_ci_low", "alpha_hat_ci_high", "n_depths", "depths", "min_seeds", "n_runs", "df"]
    return out[cols].reset_index(drop=True)


def verdict(
    ci_low: float, ci_high: float, n_depths: int | None = None, label: str = "", depth_span: float | None = None
) -> tuple[str, str]:
    """A verdict from the interval of the estimator's lin_ratio slope (α̂ − 1), with the reason in words.

    For α-parameterizations: "complete" when the whole interval lies above LAZY_THRESHOLD, "lazy"
    when it lies below, "inconclusive" when it straddles it, is wider than MAX_CI_WIDTH, is missing,
    or rests on fewer than MIN_DEPTHS_FOR_VERDICT depths (when `n_depths` is given) or on depths
    spanning less than MIN_DEPTH_SPAN (deepest/shallowest, when `depth_span` is given). For sp and mup
    (`label`), whose LR does not scale with depth, "complete" reads "not-lazy": their failure is
    instability, which the depth coordinate check judges (see `param_verdicts`).
    """
    is_alpha = not label or parse_param_label(label)[0] == "alpha"
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "inconclusive", "no interval (needs more runs than fitted parameters: add seeds or depths)"
    span = f"slope interval [{ci_low:.3f}, {ci_high:.3f}] (α̂ in [{1 + ci_low:.2f}, {1 + ci_high:.2f}])"
    if n_depths is not None and n_depths < MIN_DEPTHS_FOR_VERDICT:
        return "inconclusive", f"{span} rests on {n_depths} depths; a verdict needs {MIN_DEPTHS_FOR_VERDICT}"
    if depth_span is not None and depth_span < MIN_DEPTH_SPAN:
        return "inconclusive", (f"{span}: the grid is too shallow, its depths span {depth_span:g}x; a verdict "
                                f"needs {MIN_DEPTH_SPAN:g}x")
    if ci_high - ci_low > MAX_CI_WIDTH:
        return "inconclusive", f"{span} is wider than {MAX_CI_WIDTH} (more seeds or depths needed)"
    if ci_low > LAZY_THRESHOLD:
        return ("complete" if is_alpha else "not-lazy"), f"{span} lies above the lazy threshold {LAZY_THRESHOLD}"
    if ci_high < LAZY_THRESHOLD:
        return "lazy", f"{span} lies below the lazy threshold {LAZY_THRESHOLD}"
    return "inconclusive", f"{span} straddles the lazy threshold {LAZY_THRESHOLD}"


def combined_table(lin: pd.DataFrame, nonlin: pd.DataFrame) -> pd.DataFrame:
    """Per run and branch: exp(½·log lin_ratio + ¼·log nonlin_to_output), the combined estimator's value.

    Theory gives both terms the exponent (α − 1)/2, so the combination scales as L^(α−1) like
    lin_ratio. On real sweeps the two ratios err in opposite directions at α < 1 (lin_ratio steeper,
    nonlin_to_output/2 shallower; docs/ESTIMATOR.md), and their mean is within ±0.05 of α − 1 where
    either alone is off by up to 0.16. Combined per run, so the t interval over runs counts their
    correlation. Rows present in both tables only; attrs from `lin`.
    """
    keys = ["param", "alpha", "depth", "width", "seed", "lr", "branch"]
    both = lin.merge(nonlin, on=keys, suffixes=("_lin", "_nl"))
    value = np.exp(0.5 * stats.safe_log(both["value_lin"].to_numpy()) + 0.25 * stats.safe_log(both["value_nl"]))
    out = both[keys].assign(value=value, n_points=np.minimum(both["n_points_lin"], both["n_points_nl"]))
    out.attrs.update(lin.attrs)
    return out


def laziness(
    ds: xr.Dataset,
    window: tuple[int | None, int | None] = DEFAULT_WINDOW,
    ci: float = stats.DEFAULT_CI,
    n_boot: int | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Slopes vs depth and α̂ per (param, branch) for lin_ratio, nonlin_to_output and their combination.

    Returns `depth_slopes` rows plus columns variable ("lin_ratio", "nonlin_to_output", "combined"),
    theory, verdict and reason. The α̂ that the verdict uses is the "combined" row's
    (`combined_table`); with no nonlin_to_output records it is lin_ratio's. Other rows carry verdict
    "" (nonlin_to_output is the second-order cross-check: α̂ = 1 + slope/2). frame.attrs carries
    ratio_table's notes (steps used, runs left out). `n_boot` and `seed` belonged to the earlier
    bootstrap interval; they are accepted so that existing callers keep working and have no effect
    (the interval is now the t interval of `depth_slopes`, which needs no resampling).
    """
    tables = {v: ratio_table(ds, v, window) for v in VARIABLES if v in ds}
    if "lin_ratio" not in tables:
        raise InsufficientSweepError("the records have no lin_ratio (linearization probe off?)")
    if "nonlin_to_output" in tables:
        tables["combined"] = combined_table(tables["lin_ratio"], tables["nonlin_to_output"])
    judged_variable = "combined" if "combined" in tables else "lin_ratio"
    frames = []
    for variable, table in tables.items():
        slopes = depth_slopes(table, ci=ci, variable=variable)
        slopes.insert(2, "variable", variable)
        slopes["theory"] = [theory_slope(p, variable) for p in slopes["param"]]
        judged = [("", "")] * len(slopes)
        if variable == judged_variable:
            judged = [verdict(r["alpha_hat_ci_low"] - 1, r["alpha_hat_ci_high"] - 1, r["n_depths"], r["param"],
                              max(r["depths"]) / min(r["depths"])) for _, r in slopes.iterrows()]
        slopes["verdict"] = [v for v, _ in judged]
        slopes["reason"] = [r for _, r in judged]
        frames.append(slopes)
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(tables["lin_ratio"].attrs)
    return out


def trends_from_slopes(slopes: pd.DataFrame) -> dict[str, str]:
    """Per label, from `coordcheck.depth_coord_check` slopes: the final stream's trend vs depth after
    step 0 ("grows" if it grows in any (width, lr) cell, else that trend: "flat", "shrinks", "n/a")."""
    summary = coordcheck.slope_summary(slopes)
    return {p: ("grows" if (g["trained_trend"] == "grows").any() else str(g["trained_trend"].iloc[0]))
            for p, g in summary.groupby("param", sort=False)}


def stream_trends(ds: xr.Dataset, variable: str = "final_abs_mean") -> dict[str, str]:
    """`trends_from_slopes` of the sweep's depth coordinate check; {} without `variable` or with one depth."""
    if variable not in ds:
        return {}
    try:
        return trends_from_slopes(coordcheck.depth_coord_check(ds, variable)[1])
    except InsufficientSweepError:
        return {}


def param_verdicts(table: pd.DataFrame, trends: dict[str, str] | None = None) -> pd.DataFrame:
    """One verdict per parameterization from `laziness` output, combining its branches.

    Complete feature learning needs every branch non-lazy (D3), so: "lazy" if any branch is lazy,
    "complete" (sp/mup: "not-lazy") if all are, otherwise "inconclusive". `trends` (from
    `stream_trends`) adds the stability of sp/mup: "unstable" when their final stream grows with
    depth. Columns: param, verdict, stability ("unstable", "stable" or "" when not judged), reason.
    """
    rows = []
    for param, group in table[table["verdict"] != ""].groupby("param", sort=False):
        verdicts = set(group["verdict"])
        if "lazy" in verdicts:
            v = "lazy"
        elif verdicts <= {"complete"} or verdicts <= {"not-lazy"}:
            v = group["verdict"].iloc[0]
        else:
            v = "inconclusive"
        reason = "; ".join(f"{b}: {r}" for b, r in zip(group["branch"], group["reason"]))
        stability = ""
        if trends and param in trends and parse_param_label(param)[0] != "alpha":
            stability = "unstable" if trends[param] == "grows" else "stable"
            reason += f"; final stream vs depth after step 0: {trends[param]}"
        rows.append({"param": param, "verdict": v, "stability": stability, "reason": reason})
    return pd.DataFrame(rows, columns=["param", "verdict", "stability", "reason"])


def expectation_met(row: pd.Series, expect: str) -> bool:
    """Whether a `param_verdicts` row meets `diagnose check --expect` (one of VERDICTS)."""
    if expect == "unstable":
        return row["stability"] == "unstable"
    return row["verdict"] == expect

"""Scaling conformance: every measured exponent of a sweep next to the one its parameterization predicts.

For each quantity of `analyses.theory.QUANTITIES` (per branch or block role where it has one), each
axis the sweep varies (depth, width) and each parameterization in the sweep:
1. per run, the geometric mean of the quantity over layers and its probe steps (theory.Quantity:
   step 0, the last probe step, or every probe step ≥ 1; for 1 − CKA only the steps at which every run
   of the fit has its feature change δ below theory.DELTA_MAX, where the prediction, an expansion in δ, holds);
2. the log-log slope against depth (or width) with a 95% Student-t interval (seeds as replicates), by
   `analyses.laziness.depth_slopes` (fixed effects per cell of the other sweep dims);
3. a status against the prediction p of `analyses.theory.predicted_exponent`, with a tolerance t
   for finite-size corrections (TOLERANCE, wider for second-order quantities):
   - fail: the whole interval lies outside [p − t, p + t];
   - pass: the interval overlaps that band and is narrower than MAX_CI_WIDTH;
   - inconclusive: otherwise (too wide, no interval with one seed, fewer than MIN_LEVELS values).
Rows without a prediction are left out. Torch-free: reads the run dirs' records only.

Why these tolerances: at the small depths and widths a CPU sweep reaches (2–16 blocks), the
asymptotic exponents are approached from one side: the embedding's share of the stream at init
pulls the `stream_init` exponent towards 0, and Adam's step is not exactly η·sign at the first
steps. The values below are what separated the correct parameterizations from the broken ones on
the sweeps recorded in docs/EXPERIMENTS.md (section "Three laziness measures and conformance").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from analyses import stats
from analyses.laziness import depth_slopes
from analyses.load import InsufficientSweepError, as_sweep, list_runs, sort_by_param
from analyses.theory import AXES, QUANTITIES, Quantity, floor_exponent, predicted_exponent
from probes import schema

# Half-width of the band around the predicted exponent, per quantity (default DEFAULT_TOLERANCE).
DEFAULT_TOLERANCE = 0.2
TOLERANCE: dict[str, float] = {"nonlin_to_output": 0.4, "1-feature_cka": 0.4, "stream_init": 0.3,
                               "stream_change": 0.3, "grad_stream": 0.3, "1-linearized_share": 0.3}
MAX_CI_WIDTH = 0.6  # a pass needs an interval narrower than this
MIN_LEVELS = 3  # depths (or widths) a status needs; two points always fit a line
STATUSES = ("pass", "fail", "inconclusive")
COLUMNS = ["quantity", "component", "axis", "param", "measured", "ci_low", "ci_high", "predicted", "tolerance",
           "status", "n_levels", "min_seeds", "reason"]


def _steps(da: xr.DataArray, which: str) -> xr.DataArray:
    """The probe steps a quantity is averaged over (theory.Quantity.steps)."""
    if which == "init":
        return da.sel(step=[0]) if 0 in da["step"].values else da.isel(step=slice(0, 0))
    if which == "last":  # per run (and layer, ...), its last step with a value
        return xr.apply_ufunc(_last_finite, da, input_core_dims=[["step"]]).expand_dims("step")
    return da.sel(step=slice(1, None))


def _last_finite(values: np.ndarray) -> np.ndarray:
    """Along the last axis: the last finite entry (NaN where there is none)."""
    finite = np.isfinite(values)
    last = values.shape[-1] - 1 - np.argmax(finite[..., ::-1], axis=-1)
    picked = np.take_along_axis(values, last[..., None], axis=-1)[..., 0]
    return np.where(finite.any(axis=-1), picked, np.nan)


def quantity_table(ds: xr.Dataset, quantity: Quantity) -> pd.DataFrame:
    """Per run (and branch/role): geometric mean of the quantity over layers and its steps.

    Returns columns param, alpha, depth, width, seed, lr, branch (the branch or role; "-" when the
    quantity has none), value. Empty when the records lack the variable.
    """
    ds = as_sweep(ds)
    if quantity.variable not in ds:
        return pd.DataFrame(columns=["param", "alpha", "depth", "width", "seed", "lr", "branch", "value"])
    da = _steps(ds[quantity.variable], quantity.steps)
    if quantity.max_feature_change is not None:
        da = da.where(_perturbative(ds, da["step"], quantity.max_feature_change))
    if quantity.transform == "1-x":
        da = 1.0 - da
    logs = xr.apply_ufunc(stats.safe_log, da)
    over = [d for d in ("step", "layer") if d in logs.dims]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: runs that were not made
        value = np.exp(logs.mean(over, skipna=True))
    frame = value.rename("value").to_dataframe().reset_index()
    if quantity.selector is None:
        frame["branch"] = "-"
    else:
        frame = frame.rename(columns={quantity.selector: "branch"})
        if quantity.components is not None:
            frame = frame[frame["branch"].isin(quantity.components)]
    frame = frame[np.isfinite(frame["value"])]
    return frame[["param", "alpha", "depth", "width", "seed", "lr", "branch", "value"]].reset_index(drop=True)


def _perturbative(ds: xr.Dataset, steps: xr.DataArray, limit: float) -> xr.DataArray:
    """Per param, step and branch: True where every run's feature change (geometric mean over layers)
    is below `limit`. A common set of steps for all runs of a fit, so that no depth averages over
    steps the others leave out (1 − CKA grows with the step). False everywhere without the variable."""
    if "feature_change" not in ds:
        return xr.DataArray(False)
    change = ds["feature_change"].sel(step=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: runs that were not made
        per_run = np.exp(xr.apply_ufunc(stats.safe_log, change).mean("layer", skipna=True))
        runs = [d for d in per_run.dims if d not in ("param", "step", "branch")]
        worst = per_run.max(runs, skipna=True)
    return worst < limit


def linearized_table(ds: xr.Dataset) -> pd.DataFrame:
    """Per run: 1 − linearized_share at the run's last linearized-model record (`linearized.zarr`)."""
    rows = []
    for _, run in list_runs(ds).iterrows():
        store = Path(run["run_dir"]) / schema.LINEARIZED_STORE_NAME
        if not store.is_dir():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with xr.open_dataset(store, engine="zarr", chunks=None) as lin:
                share = lin["linearized_share"].sortby("step").values
        if share.size and np.isfinite(share[-1]):
            rows.append({**{k: run[k] for k in ("param", "alpha", "depth", "width", "seed", "lr")},
                         "branch": "-", "value": 1.0 - float(share[-1])})
    return pd.DataFrame(rows, columns=["param", "alpha", "depth", "width", "seed", "lr", "branch", "value"])


def _slopes(table: pd.DataFrame, axis: str, n_boot: int, seed: int) -> pd.DataFrame:
    """`depth_slopes` along `axis`; for width, the table's depth and width columns trade places."""
    if axis == "width":
        table = table.rename(columns={"depth": "width", "width": "depth"})
    return depth_slopes(table, n_boot=n_boot, seed=seed)


def status(measured: float, lo: float, hi: float, predicted: float, tolerance: float,
           n_levels: int, floor: float | None = None) -> tuple[str, str]:
    """(status, reason) of one row; see the module docstring.

    `floor` (theory.Quantity.floor): for an asymptotic exponent, an interval between the floor and
    the prediction (± tolerance) is "inconclusive" (not yet asymptotic), not "fail".
    """
    if n_levels < MIN_LEVELS:
        return "inconclusive", f"{n_levels} values along the axis; a status needs {MIN_LEVELS}"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive", "no interval (needs two or more seeds at each value)"
    band = (predicted - tolerance, predicted + tolerance)
    span = f"[{lo:.2f}, {hi:.2f}]"
    if not (hi < band[0] or lo > band[1]):
        if hi - lo > MAX_CI_WIDTH:
            return "inconclusive", f"interval {span} is wider than {MAX_CI_WIDTH:g}"
        return "pass", f"interval {span} overlaps {predicted:+.2f} ± {tolerance:g}"
    if floor is not None:
        wide = (min(floor, predicted) - tolerance, max(floor, predicted) + tolerance)
        if not (hi < wide[0] or lo > wide[1]):
            return "inconclusive", (f"interval {span} lies between the floor {floor:+.2f} and the limit "
                                    f"{predicted:+.2f} (small sizes, or errors adding incoherently)")
    return "fail", f"interval {span} lies outside the predicted {predicted:+.2f} ± {tolerance:g}"


def conformance(ds: xr.Dataset, quantities: Iterable[str] | None = None, n_boot: int = stats.DEFAULT_N_BOOT,
                seed: int = 0) -> pd.DataFrame:
    """The conformance table of a sweep: one row per quantity × component × axis × parameterization.

    Columns: COLUMNS (measured = fitted exponent, ci_low/ci_high its Student-t interval, predicted the
    theory exponent, status pass/fail/inconclusive with its reason). Axes the sweep does not vary
    (fewer than two depths or widths) are left out; raises InsufficientSweepError when none is varied.
    """
    ds = as_sweep(ds)
    varied = [axis for axis in AXES if ds.sizes[axis] >= 2]
    if not varied:
        raise InsufficientSweepError(
            f"conformance needs a sweep over depth or width; this one has depth {list(ds['depth'].values)} "
            f"and width {list(ds['width'].values)}")
    rows = []
    for name in quantities or QUANTITIES:
        q = QUANTITIES[name]
        table = linearized_table(ds) if q.variable == "linearized_share" else quantity_table(ds, q)
        # Fits the step window left without data (1 − CKA): the same table on every step names them.
        every_step = (quantity_table(ds, dataclasses.replace(q, max_feature_change=None))
                      if q.max_feature_change is not None else None)
        for axis in varied:
            if every_step is not None:
                rows += _outside_regime(q, every_step, table, axis)
            if table.empty or table[axis].nunique() < 2:
                continue
            for _, fit in _slopes(table, axis, n_boot, seed).iterrows():
                param, alpha = _param_of(fit["param"], fit["alpha"])
                component = None if fit["branch"] == "-" else fit["branch"]
                predicted = predicted_exponent(param, alpha, name, axis, component)
                if predicted is None:
                    continue
                tol = TOLERANCE.get(name, DEFAULT_TOLERANCE)
                verdict, reason = status(fit["slope"], fit["ci_low"], fit["ci_high"], predicted, tol, fit["n_depths"],
                                         floor_exponent(param, alpha, name, axis))
                rows.append({"quantity": name, "component": fit["branch"], "axis": axis, "param": fit["param"],
                             "measured": fit["slope"], "ci_low": fit["ci_low"], "ci_high": fit["ci_high"],
                             "predicted": predicted, "tolerance": tol, "status": verdict,
                             "n_levels": int(fit["n_depths"]), "min_seeds": int(fit["min_seeds"]), "reason": reason})
    out = pd.DataFrame(rows, columns=COLUMNS)
    return sort_by_param(out, "axis") if not out.empty else out


def _outside_regime(q: Quantity, every_step: pd.DataFrame, table: pd.DataFrame, axis: str) -> list[dict]:
    """Inconclusive rows for the fits that `q.max_feature_change` left without a probe step: those in
    `every_step` (the quantity on every step) with no run in `table` (the windowed one)."""
    fitted = set(zip(table["param"], table["branch"]))
    rows = []
    for (label, branch), group in every_step.groupby(["param", "branch"], sort=False):
        if (label, branch) in fitted or group[axis].nunique() < 2:
            continue
        param, alpha = _param_of(label, group["alpha"].iloc[0])
        predicted = predicted_exponent(param, alpha, q.name, axis, None if branch == "-" else branch)
        if predicted is None:
            continue
        rows.append({"quantity": q.name, "component": branch, "axis": axis, "param": label, "measured": math.nan,
                     "ci_low": math.nan, "ci_high": math.nan, "predicted": predicted,
                     "tolerance": TOLERANCE.get(q.name, DEFAULT_TOLERANCE), "status": "inconclusive",
                     "n_levels": int(group[axis].nunique()), "min_seeds": 0,
                     "reason": f"no probe step at which every run's feature change is below {q.max_feature_change:g} "
                               "(the second-order expansion's regime); probe earlier steps"})
    return rows


def _param_of(label: str, alpha: float) -> tuple[str, float]:
    if label in ("sp", "mup"):
        return label, math.nan
    return "alpha", float(alpha)


def failures(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a conformance table that fail."""
    return table[table["status"] == "fail"]


def records(table: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (NaN → None) with at least quantity, axis, param, measured, ci_low, ci_high,
    predicted and status; `quantity` names the component too ("update_rms[hidden_weight]")."""
    out = []
    for row in table.to_dict("records"):
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        row["quantity"] = row["quantity"] if row["component"] == "-" else f"{row['quantity']}[{row['component']}]"
        out.append(row)
    return out


def format_table(table: pd.DataFrame) -> str:
    """The matrix as text: one line per row, failures marked, then a one-line summary."""
    if table.empty:
        return "no quantity with a prediction could be fitted (too few depths/widths recorded?)"
    lines = [f"{'quantity':<34} {'axis':<6} {'param':<11} {'measured [interval]':<26} {'predicted':>9}  status"]
    for r in records(table):
        interval = "[  —  ,   —  ]" if r["ci_low"] is None else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        measured = "  nan" if r["measured"] is None else f"{r['measured']:+.2f}"
        mark = "FAIL" if r["status"] == "fail" else r["status"]
        lines.append(f"{r['quantity']:<34} {r['axis']:<6} {r['param']:<11} {measured} {interval:<20} "
                     f"{r['predicted']:>+9.2f}  {mark}")
    counts = table["status"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    failed = [r["quantity"] + f" ({r['axis']}, {r['param']})" for r in records(failures(table))]
    lines.append(f"{summary}" + (f"; failing: {'; '.join(failed)}" if failed else ""))
    return "\n".join(lines)

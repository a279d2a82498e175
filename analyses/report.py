"""Everything the analyses know about a run or a sweep, as numbers (`summarize`), as a folder of
figures plus summary.md (`write_report`), and two runs side by side (`compare_runs`).

Each analysis runs only where the sweep varies what it needs (laziness and the depth coordinate
check: two or more depths; width check: two or more widths; transfer: two or more learning rates);
the others are listed under "skipped" with the reason, so one run dir gets a short, valid report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from analyses import coordcheck, health, laziness, laziness_measures, profile, run_laziness, stats, transfer
from analyses.load import (
    SWEEP_DIMS,
    AnalysisError,
    IncompatibleRunsError,
    as_sweep,
    list_runs,
    load_metrics,
    load_status,
    open_run,
    open_sweep,
    sweep_values,
)

PathsLike = str | os.PathLike | Iterable[str | os.PathLike]
_DEPTH_VARS = ("final_abs_mean", "final_rms")
_WIDTH_VARS = ("act_rms", "update_rms", "delta0_rms")


def _analyse(ds: xr.Dataset, n_boot: int, seed: int, window: tuple[int | None, int | None]) -> dict:
    """Run every analysis the sweep supports: name → tables (DataFrames), plus "skipped": name → reason."""
    res: dict = {"skipped": {}}

    def attempt(name: str, fn):
        try:
            res[name] = fn()
        except AnalysisError as err:
            res["skipped"][name] = str(err)

    depths, widths = sweep_values(ds, "depth"), sweep_values(ds, "width")
    if len(depths) < 2:
        res["skipped"]["laziness and depth coordinate check"] = (
            f"the sweep has one depth ({depths[0]}); see 'Laziness in this run' for the per-layer measures")
        if len(list_runs(ds)) == 1:
            res["single_run"] = True
    else:
        if "lin_ratio" in ds:
            attempt("laziness", lambda: laziness.laziness(ds, window=window, n_boot=n_boot, seed=seed))
        else:
            res["skipped"]["laziness"] = "no lin_ratio records (linearization probe off?)"
        for var in _DEPTH_VARS:
            if var in ds:
                attempt(f"depth:{var}", lambda var=var: coordcheck.depth_coord_check(ds, var))
    if len(widths) < 2:
        res["skipped"]["width coordinate check"] = f"the sweep has one width ({widths[0]})"
    else:
        for var in _WIDTH_VARS:
            if var in ds:
                attempt(f"width:{var}", lambda var=var: coordcheck.width_coord_check(ds, var))
    if "final_update_share" in ds:
        attempt("concentration", lambda: profile.concentration_table(ds))
    if len(sweep_values(ds, "lr")) >= 2:
        attempt("transfer", lambda: transfer.lr_transfer(transfer.final_losses(ds), n_boot=n_boot, seed=seed))
    else:
        res["skipped"]["transfer"] = f"the sweep has one learning rate ({sweep_values(ds, 'lr')[0]:g})"
    return res


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, tuples and arrays to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _records(df: pd.DataFrame, drop: tuple[str, ...] = ()) -> list[dict]:
    return [_clean(r) for r in df.drop(columns=[c for c in drop if c in df]).to_dict("records")]


def _by_param(df: pd.DataFrame, drop: tuple[str, ...] = ("alpha",)) -> dict[str, list[dict]]:
    return {p: _records(g.drop(columns="param"), drop) for p, g in df.groupby("param", sort=False)}


_BRANCH_KEYS = ("slope", "ci_low", "ci_high", "slope_fd", "slope_fd_ci_low", "slope_fd_ci_high", "local_slopes",
                "theory", "n_depths", "min_seeds", "n_runs")
_ALPHA_KEYS = ("alpha_hat", "alpha_hat_ci_low", "alpha_hat_ci_high")


def _laziness_summary(table: pd.DataFrame, trends: dict[str, str]) -> dict:
    """Per label: verdict, stability, reason, theory and per branch the lin_ratio slope (old keys), α̂
    with its interval from the verdict's estimator, α̂ from lin_ratio alone, and the nonlin cross-check."""
    verdicts = laziness.param_verdicts(table, trends)
    out = {}
    for _, pv in verdicts.iterrows():
        rows = table[table["param"] == pv["param"]]
        branches = {}
        for _, r in rows[rows["variable"] == "lin_ratio"].iterrows():
            branches[r["branch"]] = {k: r[k] for k in _BRANCH_KEYS} | {
                f"{k.replace('alpha_hat', 'alpha_hat_lin')}": r[k] for k in _ALPHA_KEYS}
        for _, r in rows[rows["verdict"] != ""].iterrows():
            branches.setdefault(r["branch"], {}).update(
                {k: r[k] for k in _ALPHA_KEYS} | {"estimator": r["variable"], "verdict": r["verdict"],
                                                  "reason": r["reason"]})
        for _, r in rows[rows["variable"] == "nonlin_to_output"].iterrows():
            branches.setdefault(r["branch"], {})["nonlin_to_output"] = {
                k: r[k] for k in ("slope", "ci_low", "ci_high", *_ALPHA_KEYS, "local_slopes", "theory")}
        out[pv["param"]] = {"verdict": pv["verdict"], "stability": pv["stability"], "reason": pv["reason"],
                            "theory": laziness.theory_slope(pv["param"]), "branches": branches}
    return _clean(out)


def _stream_trends(res: dict) -> dict[str, str]:
    """Per label: the depth coordinate check's trend of the final stream after step 0 (sp/mup stability)."""
    return laziness.trends_from_slopes(res["depth:final_abs_mean"][1]) if "depth:final_abs_mean" in res else {}


def _summary_from(ds: xr.Dataset, res: dict) -> dict:
    runs = list_runs(ds)
    out: dict = {
        "runs": _records(runs[["run_dir", "param", "depth", "width", "seed", "lr", "state"]]),
        "sweep": {d: _clean(sweep_values(ds, d)) for d in SWEEP_DIMS},
        "constants": {"lazy_threshold": laziness.LAZY_THRESHOLD, "alpha_threshold": 1 + laziness.LAZY_THRESHOLD,
                      "max_ci_width": laziness.MAX_CI_WIDTH,
                      "min_depths_for_verdict": laziness.MIN_DEPTHS_FOR_VERDICT,
                      "flat_tolerance": coordcheck.FLAT_TOLERANCE},
    }
    if "laziness" in res:
        out["laziness"] = _laziness_summary(res["laziness"], _stream_trends(res))
        out["laziness_notes"] = _clean({"probe_steps": res["laziness"].attrs.get("steps", []),
                                        "excluded_runs": res["laziness"].attrs.get("excluded", []),
                                        "steps_not_common": res["laziness"].attrs.get("dropped_steps", [])})
    for kind in ("depth", "width"):
        section = {}
        for key, (_, slopes) in ((k, v) for k, v in res.items() if k.startswith(f"{kind}:")):
            section[key.split(":", 1)[1]] = _by_param(coordcheck.slope_summary(slopes))
        if section:
            out[f"{kind}_coord_check"] = section
    if "concentration" in res:
        conc = res["concentration"]
        mean = conc.groupby(["param", "depth", "width", "lr"], sort=False)[
            ["entropy_norm", "frac_layers_50", "embed_share"]].mean().reset_index()
        out["concentration"] = _by_param(mean)
    if "transfer" in res:
        tr = res["transfer"]
        out["transfer"] = {p: {"optima": _records(tr.optima[tr.optima["param"] == p].drop(columns=["param", "alpha"])),
                               "drift": _records(tr.drift[tr.drift["param"] == p].drop(columns=["param", "alpha"]))}
                           for p in tr.optima["param"].unique()}
    out["skipped"] = dict(res["skipped"])
    out["missing_data"] = list(ds.attrs.get("missing_data", []))  # damaged stores: see load.missing_data
    return _clean(out)


def _open(ds_or_paths: xr.Dataset | PathsLike) -> xr.Dataset:
    return as_sweep(ds_or_paths) if isinstance(ds_or_paths, xr.Dataset) else open_sweep(ds_or_paths)


def summarize(
    ds_or_paths: xr.Dataset | PathsLike,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
    window: tuple[int | None, int | None] = laziness.DEFAULT_WINDOW,
) -> dict:
    """The sweep's key numbers as a JSON-serializable dict (NaN and inf become null).

    Keys: runs (list of {run_dir, param, depth, width, seed, lr, state}); sweep (values of each
    sweep dim); constants; laziness (per param label: verdict, reason, theory, and per branch the
    lin_ratio slope vs depth with ci_low/ci_high/theory/verdict and the nonlin_to_output slope);
    depth_coord_check and width_coord_check (per variable, per label: init and trained slopes with
    trends); concentration (per label and depth); transfer (per label: optima per depth, drift);
    skipped (analysis → why it did not run); missing_data (one line per store variable whose
    recorded steps have chunk files missing on disk; [] when all is readable). Sections whose
    analysis did not run are absent.
    """
    ds = _open(ds_or_paths)
    return _summary_from(ds, _analyse(ds, n_boot, seed, window))


# --- report folder -------------------------------------------------------------------------------------


def _main_cell(df: pd.DataFrame, dims: tuple[str, ...]) -> pd.DataFrame:
    """Rows of the (dims) combination with the most rows: one cell for figures that cannot mix them."""
    dims = tuple(d for d in dims if d in df)
    if not dims or all(df[d].nunique() <= 1 for d in dims):
        return df
    best = df.groupby(list(dims)).size().idxmax()
    best = best if isinstance(best, tuple) else (best,)
    mask = np.logical_and.reduce([df[d] == v for d, v in zip(dims, best)])
    return df[mask]


def _figures(ds: xr.Dataset, res: dict, out_dir: Path, dpi: int) -> list[Path]:
    from analyses import figures  # seaborn/matplotlib are only needed here

    made: dict[str, object] = {}
    if "laziness" in res:
        table = _main_cell(laziness.ratio_table(ds), ("width", "lr"))
        made["lin_ratio_vs_depth.png"] = figures.lin_ratio_figure(table, res["laziness"])
    if "depth:final_abs_mean" in res:
        table = _main_cell(res["depth:final_abs_mean"][0], ("width", "lr"))
        made["depth_coord_check.png"] = figures.depth_coord_check_figure(table)
    if "width:act_rms" in res:
        table = _main_cell(res["width:act_rms"][0], ("depth", "lr"))
        made["width_coord_check.png"] = figures.width_coord_check_figure(table)
    if "transfer" in res:
        losses = _main_cell(res["transfer"].losses, ("width",))
        made["lr_transfer.png"] = figures.transfer_figure(losses, res["transfer"].optima)
    if "delta0_rms" in ds:
        runs = _main_cell(list_runs(ds), ("width", "lr"))
        tables = {}
        if len(runs) == 1 or runs["param"].nunique() == 1 and runs["depth"].nunique() == 1:
            r = runs.iloc[0]
            cell = ds.sel(param=r["param"], depth=r["depth"], width=r["width"], lr=r["lr"])
            for site in ("attn_add", "mlp_add", "resid_post"):
                tables[f"{r['param']}, L={r['depth']}: {site}"] = profile.layer_step_table(cell, component=site)
        else:  # one panel per parameterization, at its deepest depth
            for param, g in runs.groupby("param", sort=False):
                r = g.sort_values("depth").iloc[-1]
                cell = ds.sel(param=param, depth=r["depth"], width=r["width"], lr=r["lr"])
                tables[f"{param}, L={r['depth']}: mlp_add"] = profile.layer_step_table(cell, component="mlp_add")
        if any((t.to_numpy() > 0).any() for t in tables.values()):  # all zero before the first update
            made["feature_updates_heatmap.png"] = figures.update_heatmap_figure(tables)
    if "laziness" in res:  # the laziness measures side by side (analyses.laziness_measures)
        tables = laziness_measures.measure_tables(ds)
        if len(tables) > 1:
            made["laziness_measures_vs_depth.png"] = laziness_measures.measures_figure(tables)
    if res.get("single_run"):
        tables = run_laziness.layer_step_tables(ds)
        if tables and any(t.size for per in tables.values() for t in per.values()):
            made["laziness_by_layer.png"] = run_laziness.laziness_heatmap_figure(tables)
    paths = []
    for name, fig in made.items():
        fig.savefig(out_dir / name, dpi=dpi)
        paths.append(out_dir / name)
    return paths


def _fmt(v) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "–" if v is None else str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of `df` (no tabulate dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _markdown(ds: xr.Dataset, res: dict, figures: list[Path]) -> str:
    runs = list_runs(ds)
    lines = ["# Training-dynamics report", "", f"{len(runs)} run(s). Sweep: " + "; ".join(
        f"{d} = {_fmt(sweep_values(ds, d))}" for d in SWEEP_DIMS), ""]
    if ds.attrs.get("missing_data"):
        lines += ["## Warning: missing data", "", "Chunk files of these stores are missing on disk; the values "
                  "below read as NaN and every number that uses them is computed without them:", ""]
        lines += [f"- {line}" for line in ds.attrs["missing_data"]] + [""]
    if "laziness" in res:
        lz = res["laziness"]
        excluded = lz.attrs.get("excluded", [])
        lines += ["## Laziness: linearization ratio vs depth", "",
                  f"Slope of log ‖nl‖/‖lin‖ vs log depth (least squares over runs) with a {stats.DEFAULT_CI:.0%} "
                  "Student-t interval; α̂ = 1 + slope (nonlin_to_output: 1 + slope/2); local slopes between "
                  "consecutive depths alongside. The verdict's α̂ is the 'combined' rows' (½·log lin_ratio + "
                  f"¼·log nonlin_to_output per run): complete if its interval lies above "
                  f"{1 + laziness.LAZY_THRESHOLD:g}, lazy if below, otherwise (or if wider than "
                  f"{laziness.MAX_CI_WIDTH}, with fewer than {laziness.MIN_DEPTHS_FOR_VERDICT} depths, or with "
                  f"depths spanning less than {laziness.MIN_DEPTH_SPAN:g}x) inconclusive. sp/mup scale no LR "
                  "with depth: they get 'not-lazy' (never 'complete'), and 'unstable' when their final stream "
                  "grows with depth (depth coordinate check). Method and "
                  "evidence: docs/ESTIMATOR.md.", "",
                  f"Probe steps averaged (common to every run): {_fmt(lz.attrs.get('steps', []))}."
                  + (f" Steps recorded by only some runs, left out: {_fmt(lz.attrs['dropped_steps'])}."
                     if lz.attrs.get("dropped_steps") else ""),
                  *([f"Runs left out (not finished): {', '.join(excluded)}."] if excluded else []), "",
                  markdown_table(laziness.param_verdicts(lz, _stream_trends(res))[["param", "verdict", "stability"]]),
                  "", markdown_table(lz[["param", "variable", "branch", "slope", "ci_low", "ci_high", "alpha_hat",
                                         "alpha_hat_ci_low", "alpha_hat_ci_high", "local_slopes", "theory", "verdict",
                                         "n_depths", "min_seeds", "n_runs"]]), ""]
    for kind, title in (("depth", "Depth coordinate check"), ("width", "Width coordinate check")):
        for key in [k for k in res if k.startswith(f"{kind}:")]:
            summ = coordcheck.slope_summary(res[key][1])
            lines += [f"## {title}: {key.split(':', 1)[1]}", "",
                      f"Log-log slope vs {kind} at initialization (step 0) and median over steps ≥ 1; "
                      f"flat means |slope| ≤ {coordcheck.FLAT_TOLERANCE}; 'diverged' means seeds stopped on a "
                      "non-finite loss or recorded ±inf (n_diverged): the slope is then over the survivors only.",
                      "", markdown_table(summ), ""]
    if "concentration" in res:
        conc = res["concentration"].groupby(["param", "depth", "width", "lr"], sort=False)[
            ["entropy_norm", "frac_layers_50", "embed_share"]].mean().reset_index()
        lines += ["## Where learning happens", "",
                  "Per-layer shares of the final-stream update at the last probe step (seed mean): normalized "
                  "entropy (1 = even over layers) and the fraction of layers holding half of it.", "",
                  markdown_table(conc), ""]
    if "transfer" in res:
        tr = res["transfer"]
        lines += ["## Learning-rate transfer", "", "Optimal η_base per depth (quadratic fit in log2 lr; interval "
                  "over seeds, log2 units):", "", markdown_table(tr.optima), "",
                  "Drift: slope of log2(lr*) vs log2(depth) (0 = transfers); depths whose optimum sits at the "
                  "grid's edge are left out of it (edge_depths). Runs that crashed without a non-finite loss "
                  "(no bad_step) are missing (n_missing), not diverged:", "", markdown_table(tr.drift), ""]
    if res.get("single_run"):
        lines += run_laziness.summary_lines(ds)
    lines += health.health_markdown(ds)
    if res["skipped"]:
        lines += ["## Not analysed", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    lines += ["## Runs", "", markdown_table(runs[["param", "depth", "width", "seed", "lr", "state", "run_dir"]]), ""]
    return "\n".join(lines)


def write_report(
    paths: xr.Dataset | PathsLike,
    out_dir: str | os.PathLike,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
    window: tuple[int | None, int | None] = laziness.DEFAULT_WINDOW,
    dpi: int = 110,
) -> dict:
    """Write the figures the sweep supports (PNG at `dpi`), summary.md and summary.json into `out_dir`.

    `out_dir` is created. Returns the `summarize` dict with "files" (paths written, as strings) added.
    """
    ds = _open(paths)
    res = _analyse(ds, n_boot, seed, window)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _figures(ds, res, out, dpi)
    (out / "summary.md").write_text(_markdown(ds, res, written))
    summary = _summary_from(ds, res)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["files"] = [str(p) for p in [*written, out / "summary.md", out / "summary.json"]]
    return summary


# --- two runs side by side -------------------------------------------------------------------------------


def _run_metrics(path: Path, ds: xr.Dataset) -> dict:
    metrics = load_metrics(path)
    val = metrics["val_loss"].dropna()
    train_steps = metrics.dropna(subset=["loss"])["step"]
    last = ds.isel(step=-1)
    out = {
        "param": ds.attrs["param_label"], "depth": int(ds.attrs["depth"]), "width": int(ds.attrs["width"]),
        "seed": int(ds.attrs["seed"]), "lr": float(ds.attrs["lr"]),
        "state": load_status(path).get("state", "unknown"),
        "last_train_step": int(train_steps.iloc[-1]) if len(train_steps) else math.nan,
        "last_probe_step": int(last["step"]),
        "final_train_loss": transfer.last_train_loss(metrics),
        "final_val_loss": float(val.iloc[-1]) if len(val) else math.nan,
    }
    for var in laziness.VARIABLES:
        if var in ds:
            try:
                table = laziness.ratio_table(ds, var)
            except AnalysisError:  # nothing recorded after step 0 yet
                continue
            for _, r in table.iterrows():
                out[f"{var} ({r['branch']}, geo-mean)"] = float(r["value"])
    for var in ("final_rms", "final_abs_mean", "final_delta0_rms", "probe_loss"):
        if var in ds:
            out[f"{var} (last step)"] = float(last[var])
    if "delta0_rms" in ds:
        for site in ("attn_add", "mlp_add", "resid_post"):
            out[f"delta0_rms {site} (last step, layer mean)"] = float(last["delta0_rms"].sel(site=site).mean())
    if "final_update_share" in ds:
        conc = profile.concentration(last["final_update_share"].values)
        out["update entropy_norm (last step)"] = conc["entropy_norm"]
        out["update frac_layers_50 (last step)"] = conc["frac_layers_50"]
    return out


def _names(names: set[str], shown: int = 5) -> str:
    names = sorted(names)
    if not names:
        return "none"
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def compare_runs(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> pd.DataFrame:
    """Key metrics of two runs side by side: rows are metrics, columns a, b and b/a (numbers only).

    Losses are nats/token; ratios are geometric means over layers and probe steps ≥ 1; "last step"
    values are at each run's last probe step. Raises IncompatibleRunsError when the runs' schema
    versions or recorded variables differ (their numbers would not mean the same thing).
    """
    a, b = Path(dir_a), Path(dir_b)
    ds_a, ds_b = open_run(a), open_run(b)
    if ds_a.attrs["schema_version"] != ds_b.attrs["schema_version"]:
        raise IncompatibleRunsError(
            f"{a} has schema_version {ds_a.attrs['schema_version']}, {b} has {ds_b.attrs['schema_version']}")
    va, vb = set(ds_a.data_vars), set(ds_b.data_vars)
    if va != vb:
        raise IncompatibleRunsError(
            f"the runs record different variables: only in {a}: {_names(va - vb)}; only in {b}: {_names(vb - va)}")
    ma, mb = _run_metrics(a, ds_a), _run_metrics(b, ds_b)
    rows = []
    for key in dict.fromkeys([*ma, *mb]):  # union, in order
        x, y = ma.get(key, math.nan), mb.get(key, math.nan)
        numeric = key != "seed" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        ratio = y / x if numeric and x not in (0, 0.0) and math.isfinite(x) and math.isfinite(y) else math.nan
        rows.append({"metric": key, "a": x, "b": y, "b/a": ratio})
    out = pd.DataFrame(rows).set_index("metric")
    out.attrs.update(a=str(a), b=str(b))
    return out

"""The laziness measures of one depth sweep side by side: values vs depth, slopes, intervals, one figure.

Measures (analyses.theory.QUANTITIES): `lin_ratio` (JVP of one update), `feature_change` and
`1-feature_cka` (Jacobian-free, since θ_0), and `1-linearized_share` (loss level: the learning the
block-linearized surrogate misses). Each reduced per run as in `analyses.conformance`, fitted against
depth with `analyses.laziness.depth_slopes`, and compared with `analyses.theory`. Torch-free.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from analyses import stats
from analyses.conformance import linearized_table, quantity_table
from analyses.laziness import depth_slopes
from analyses.load import parse_param_label, sort_by_param
from analyses.theory import QUANTITIES, predicted_exponent

MEASURES: tuple[str, ...] = ("lin_ratio", "feature_change", "1-feature_cka", "1-linearized_share")
LABELS = {"lin_ratio": "‖nl‖/‖lin‖ (one update, JVP)", "feature_change": "feature change since θ_0",
          "1-feature_cka": "1 − CKA(φ_t, φ_0)", "1-linearized_share": "1 − linearized share (loss)"}


def measure_tables(ds: xr.Dataset) -> dict[str, pd.DataFrame]:
    """measure → per-run table (param, alpha, depth, width, seed, lr, branch, value)."""
    out = {}
    for name in MEASURES:
        q = QUANTITIES[name]
        table = linearized_table(ds) if q.variable == "linearized_share" else quantity_table(ds, q)
        if not table.empty:
            out[name] = table
    return out


def slopes(tables: dict[str, pd.DataFrame], n_boot: int = stats.DEFAULT_N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Depth slope [interval] per measure, parameterization and branch, with the theory exponent."""
    frames = []
    for name, table in tables.items():
        if table["depth"].nunique() < 2:
            continue
        fit = depth_slopes(table, n_boot=n_boot, seed=seed)
        fit.insert(0, "measure", name)
        fit["theory"] = [predicted_exponent(*_param(p), name, "depth", None if b == "-" else b)
                         for p, b in zip(fit["param"], fit["branch"])]
        frames.append(fit)
    out = pd.concat(frames, ignore_index=True)
    return out[["measure", "param", "branch", "slope", "ci_low", "ci_high", "theory", "n_depths", "min_seeds"]]


def _param(label: str) -> tuple[str, float]:
    param, alpha = parse_param_label(label)
    return param, alpha


def measures_figure(tables: dict[str, pd.DataFrame]):
    """One panel per measure: geometric mean over seeds (± seed range) vs depth, one line per
    parameterization and branch, log-log axes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.0 * len(tables), 3.4), squeeze=False, constrained_layout=True)
    for ax, (name, table) in zip(axes[0], tables.items()):
        table = sort_by_param(table, "branch", "depth")
        for (param, branch), g in table.groupby(["param", "branch"], sort=False):
            logs = g.assign(log=stats.safe_log(g["value"])).groupby("depth")["log"]
            mean, lo, hi = np.exp(logs.mean()), np.exp(logs.min()), np.exp(logs.max())
            style = "-" if branch in ("mlp", "-") else "--"
            label = param if branch == "-" else f"{param} {branch}"
            line, = ax.plot(mean.index, mean.values, style, marker="o", ms=3, label=label)
            ax.fill_between(mean.index, lo.values, hi.values, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("depth L")
        ax.set_title(LABELS[name], fontsize=9)
        ax.legend(fontsize=6)
    return fig

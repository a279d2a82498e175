"""Figures: one function per figure, taking the analyses' tables and returning a matplotlib Figure.

Figures are built on `matplotlib.figure.Figure` directly, not through pyplot: no global figure
state, no GUI backend needed (saving a PNG renders with Agg), and a notebook still displays the
returned object. seaborn supplies the style, palettes and the heatmap. No torch.

- `lin_ratio_figure`: the corrected Fig. 6, linearization ratio vs depth per parameterization.
- `depth_coord_check_figure`: Fig. 7, final-stream size vs depth, one line per probe step.
- `width_coord_check_figure`: activation size vs width, one line per probe step.
- `update_heatmap_figure`: layer × step heatmaps of feature updates.
- `transfer_figure`: loss vs learning rate per depth, one panel per parameterization.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from analyses.load import label_sort_key

_STYLE = "whitegrid"
_PANEL = (4.2, 3.4)  # inches per panel


def _params(df: pd.DataFrame) -> list[str]:
    return sorted(df["param"].unique(), key=label_sort_key)


def _panels(n: int, sharey: bool = True, rows: int = 1, style: str = _STYLE) -> tuple[Figure, np.ndarray]:
    with sns.axes_style(style):
        fig = Figure(figsize=(_PANEL[0] * n, _PANEL[1] * rows), layout="constrained")
        axes = fig.subplots(rows, n, squeeze=False, sharey=sharey)
    return fig, axes


def _log_ticks(ax, values: list) -> None:
    """Label a log x axis at the swept values only (no 3×10⁰ minor labels)."""
    ax.set_xticks(values, labels=[f"{v:g}" for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _one_cell(table: pd.DataFrame, fixed: tuple[str, ...]) -> None:
    """Refuse a table that mixes sweep cells a figure would draw on top of each other."""
    mixed = [c for c in fixed if c in table and table[c].nunique() > 1]
    if mixed:
        raise ValueError(f"the table mixes several {', '.join(mixed)}: select one value of each first")


def lin_ratio_figure(table: pd.DataFrame, slopes: pd.DataFrame | None = None, variable: str = "lin_ratio") -> Figure:
    """Linearization ratio vs depth (log-log): per parameterization the median over seeds with the
    25–75% band, one panel per branch; the fitted slope, its interval and theory in the legend.

    `table` is `laziness.ratio_table` output for one (width, lr); `slopes` is `laziness.laziness`
    or `laziness.depth_slopes` output (rows of other variables are ignored).
    """
    _one_cell(table, ("width", "lr"))
    branches = sorted(table["branch"].unique())
    params = _params(table)
    colors = dict(zip(params, sns.color_palette("colorblind", len(params))))
    fig, axes = _panels(len(branches))
    for ax, branch in zip(axes[0], branches):
        for param in params:
            sub = table[(table["branch"] == branch) & (table["param"] == param)]
            q = sub.groupby("depth")["value"].quantile([0.25, 0.5, 0.75]).unstack()
            label = param
            if slopes is not None:
                row = slopes[(slopes["param"] == param) & (slopes["branch"] == branch)]
                if "variable" in row:
                    row = row[row["variable"] == variable]
                if len(row):
                    r = row.iloc[0]
                    if not np.isfinite(r["slope"]):
                        label += ": one depth, no slope"
                    elif not np.isfinite(r["ci_low"]):
                        label += f": slope {r['slope']:.2f} (no interval)"
                    else:
                        label += f": slope {r['slope']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                    if "theory" in r and np.isfinite(r["slope"]):
                        label += f", theory {r['theory']:.2f}"
            ax.plot(q.index, q[0.5], "o-", color=colors[param], label=label)
            ax.fill_between(q.index, q[0.25], q[0.75], color=colors[param], alpha=0.25, linewidth=0)
        ax.set(xscale="log", yscale="log", xlabel="depth L", title=f"{branch} branch")
        _log_ticks(ax, sorted(table["depth"].unique()))
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("‖nl‖ / ‖lin‖" if variable == "lin_ratio" else variable)
    fig.suptitle(f"{variable} vs depth (median over seeds, 25–75% band)")
    return fig


def _scaling_figure(table: pd.DataFrame, over: str, component: str | None, ylabel: str, title: str) -> Figure:
    if component is not None and (table["component"] != "").any():
        table = table[table["component"] == component]
        if table.empty:
            raise ValueError(f"no rows for component {component!r}")
    others = tuple(c for c in ("depth", "width", "lr") if c != over)
    _one_cell(table, others)
    params = _params(table)
    steps = sorted(table["step"].unique())
    colors = dict(zip(steps, sns.color_palette("viridis", len(steps))))
    fig, axes = _panels(len(params))
    for ax, param in zip(axes[0], params):
        sub = table[table["param"] == param]
        for step in steps:
            s = sub[sub["step"] == step].sort_values(over)
            ax.errorbar(s[over], s["mean"], yerr=s["sem"].fillna(0), marker="o", ms=3, color=colors[step],
                        label=f"step {step}", capsize=2)
        ax.set(xscale="log", yscale="log", xlabel=over, title=param)
        _log_ticks(ax, sorted(table[over].unique()))
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best", ncol=2 if len(steps) > 6 else 1)
    fig.suptitle(title)
    return fig


def depth_coord_check_figure(table: pd.DataFrame, variable: str = "final_abs_mean") -> Figure:
    """Fig. 7: `variable` (mean ± s.e. over seeds) vs depth, one panel per param, one line per step.

    `table` is `coordcheck.depth_coord_check(...)[0]` (or `scaling_table(ds, variable, "depth")`) for
    one (width, lr).
    """
    return _scaling_figure(table, "depth", None, variable, f"Depth coordinate check: {variable} of the final stream")


def width_coord_check_figure(
    table: pd.DataFrame, component: str | None = "resid_post", variable: str = "act_rms"
) -> Figure:
    """µP coordinate check: `variable` at one site/role vs width, one panel per param, a line per step.

    `table` is `coordcheck.width_coord_check(...)[0]` for one (depth, lr).
    """
    return _scaling_figure(table, "width", component, f"{variable} ({component})",
                           f"Width coordinate check: {variable} at {component}")


def update_heatmap_figure(tables: Mapping[str, pd.DataFrame], label: str = "RMS of h(t) − h(0)",
                          shared_scale: bool = True) -> Figure:
    """Layer × step heatmaps (log colour scale), one panel per entry of `tables` (title → table).

    Each table is `profile.layer_step_table` output: index layer, columns probe step. Non-positive
    entries (step 0 of an update) are blank. `shared_scale`: one colour scale for every panel, so that
    panels (say α = ½ and α = 1) compare by colour; False gives each panel its own range.
    """
    fig, axes = _panels(len(tables), sharey=False, style="white")
    panels = {title: table.where(table > 0) for title, table in tables.items()}

    def log_norm(*frames: pd.DataFrame) -> LogNorm | None:
        values = np.concatenate([f.to_numpy(dtype=float).ravel() for f in frames])
        finite = values[np.isfinite(values)]
        return LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None

    shared = log_norm(*panels.values()) if shared_scale and panels else None
    for ax, (title, values) in zip(axes[0], panels.items()):
        norm = shared if shared_scale else log_norm(values)
        sns.heatmap(values, ax=ax, norm=norm, cmap="magma", cbar_kws={"label": label})
        ax.invert_yaxis()  # layer 0 at the bottom, as in the network
        ax.set(title=title, xlabel="probe step", ylabel="layer")
    return fig


def transfer_figure(losses: pd.DataFrame, optima: pd.DataFrame | None = None) -> Figure:
    """Final loss (seed mean) vs learning rate, one line per depth, one panel per param.

    `losses` is `transfer.final_losses` output for one width; diverged LRs are drawn as × on the
    panel's top edge; `optima` (`lr_transfer(...).optima`) adds each depth's fitted optimum.
    """
    _one_cell(losses, ("width",))
    losses = losses[losses["usable"]]
    params = _params(losses)
    depths = sorted(losses["depth"].unique())
    colors = dict(zip(depths, sns.color_palette("rocket_r", len(depths) + 1)[1:]))
    fig, axes = _panels(len(params), sharey=False)
    for ax, param in zip(axes[0], params):
        sub = losses[losses["param"] == param]
        finite = sub.loc[np.isfinite(sub["loss"]), "loss"]
        top = finite.max() if len(finite) else 1.0
        for depth in depths:
            per_lr = sub[sub["depth"] == depth].groupby("lr")["loss"].mean()
            ok = np.isfinite(per_lr)
            ax.plot(per_lr.index[ok], per_lr[ok], "o-", color=colors[depth], label=f"L={depth}")
            if (~ok).any():
                ax.plot(per_lr.index[~ok], np.full((~ok).sum(), top), "x", color=colors[depth], ms=8)
            if optima is not None:
                opt = optima[(optima["param"] == param) & (optima["depth"] == depth)].dropna(subset=["lr_opt"])
                if len(opt):
                    ax.axvline(opt["lr_opt"].iloc[0], color=colors[depth], ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="base learning rate η_base", title=param)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final loss (nats/token)")
    fig.suptitle("LR transfer across depth (dotted: fitted optimum; ×: diverged)")
    return fig

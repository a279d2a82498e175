"""What one run shows about laziness: three measures per layer and branch over probe steps.

A single run cannot give a verdict (that needs the slope over depth of a sweep), but it shows where
and when the blocks learn non-linearly. Three measures, independent in how they are computed:
- `lin_ratio` ‖nl‖/‖lin‖: the non-linear part of a branch's response to one optimizer update, relative
  to its JVP (linear) part (probes.linearization);
- `feature_change` ‖φ(h;θ_t) − φ(h;θ_0)‖/‖φ(h;θ_0)‖: how far the branch's own weights have moved its
  internal features since initialization (probes.feature_change, no Jacobian);
- `1 − feature_cka`: how much those features changed beyond a rotation and rescaling.
Torch-free.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import xarray as xr

from analyses.load import as_sweep

MEASURES: dict[str, str] = {
    "lin_ratio": "‖nl‖ / ‖lin‖ of one update",
    "feature_change": "feature change since θ_0",
    "1-feature_cka": "1 − CKA(φ_t, φ_0)",
}
WHAT_IT_LOOKS_LIKE = (
    "A lazy model shows all three measures shrinking with depth (deep layers darker than shallow "
    "ones, and the whole map darker in a deeper model of the same parameterization): its blocks learn "
    "through their linearization. A complete (CompleteP) model keeps them of the same order at every "
    "layer and at every depth."
)


def layer_step_tables(ds: xr.Dataset) -> dict[str, dict[str, pd.DataFrame]]:
    """measure → branch → DataFrame (index layer, columns probe step ≥ 1) for the first run in `ds`.

    Measures missing from the records are left out; step 0 is left out (the feature change is 0
    there and the first update is Adam's sign-like step).
    """
    ds = as_sweep(ds)
    cell = ds.isel(param=0, depth=0, width=0, seed=0, lr=0)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for measure in MEASURES:
        variable = measure.removeprefix("1-")
        if variable not in cell:
            continue
        da = cell[variable].sel(step=slice(1, None))
        if measure.startswith("1-"):
            da = 1.0 - da
        da = da.dropna("layer", how="all")
        out[measure] = {str(b): da.sel(branch=b).transpose("layer", "step").to_pandas() for b in da["branch"].values}
    return out


def sweep_command(ds: xr.Dataset) -> str:
    """The `diagnose sweep` command that gives a verdict for this run's configuration: the same
    settings at four depths around its own, three seeds."""
    ds = as_sweep(ds)
    run = ds.isel(param=0, depth=0, width=0, seed=0, lr=0)
    depth = int(run["depth"])
    depths = sorted({max(1, depth // 2), depth, 2 * depth, 4 * depth})
    label = str(run["param"].values)
    parts = ["diagnose sweep --out sweeps/" + label.replace("=", "") + f"_w{int(run['width'])}_depth"]
    if label.startswith("alpha="):
        parts.append(f"--param alpha --alpha {float(label.split('=')[1]):g}")
    else:
        parts.append(f"--param {label}")
    parts.append(f"--width {int(run['width'])} --depth {','.join(map(str, depths))} --seed 0,1,2")
    parts.append(f"--lr {float(run['lr']):.6g}")
    config = _config(ds)
    train, probes = config.get("train", {}), config.get("probes") or {}
    if "steps" in train:
        parts.append(f"--steps {train['steps']}")
    if "every" in probes:
        parts.append(f"--probe-every {probes['every']}")
    return " ".join(parts)


def _config(ds: xr.Dataset) -> dict:
    """The run's stored config (config.json next to the records), {} when unavailable."""
    from pathlib import Path

    run_dir = ds["run_dir"].values.ravel()
    run_dir = next((str(v) for v in run_dir if isinstance(v, str) and v), "")
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def laziness_heatmap_figure(tables: dict[str, dict[str, pd.DataFrame]], title: str = ""):
    """One row per measure, one column per branch: layer × probe step heatmaps, log colour scale,
    one scale per measure (shared by its branches)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    measures = list(tables)
    branches = sorted({b for t in tables.values() for b in t})
    fig, axes = plt.subplots(len(measures), len(branches), figsize=(4.2 * len(branches), 2.6 * len(measures)),
                             squeeze=False, constrained_layout=True)
    for i, measure in enumerate(measures):
        values = np.concatenate([t.to_numpy().ravel() for t in tables[measure].values()])
        values = values[np.isfinite(values) & (values > 0)]
        norm = LogNorm(vmin=values.min(), vmax=values.max()) if values.size else None
        image = None
        for j, branch in enumerate(branches):
            ax = axes[i, j]
            table = tables[measure].get(branch)
            if table is None:
                ax.axis("off")
                continue
            data = np.where(table.to_numpy() > 0, table.to_numpy(), np.nan)
            image = ax.imshow(data, aspect="auto", origin="lower", norm=norm, cmap="viridis", interpolation="nearest")
            steps = list(table.columns)
            ticks = sorted({0, len(steps) - 1, (len(steps) - 1) // 2})
            ax.set_xticks(ticks, [str(steps[k]) for k in ticks])
            ax.set_yticks(range(len(table.index)), [str(v) for v in table.index])
            ax.set_xlabel("probe step")
            ax.set_ylabel("layer")
            ax.set_title(f"{branch}: {MEASURES[measure]}", fontsize=9)
        if image is not None:
            fig.colorbar(image, ax=list(axes[i]), shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def summary_lines(ds: xr.Dataset) -> list[str]:
    """Markdown lines for the single-run report: the layer-averaged measures at the last probe step,
    what lazy and complete look like, and the sweep command that gives a verdict."""
    tables = layer_step_tables(ds)
    lines = ["## Laziness in this run", "", WHAT_IT_LOOKS_LIKE, ""]
    if tables:
        lines += ["| measure | branch | first layer | last layer | layer mean (geometric) |", "|---|---|---|---|---|"]
        for measure, per_branch in tables.items():
            for branch, table in per_branch.items():
                if table.size == 0:  # nothing recorded (e.g. a damaged store): the report warns of it
                    continue
                last = table.iloc[:, -1].to_numpy(dtype=float)
                finite = last[np.isfinite(last) & (last > 0)]
                gm = float(np.exp(np.log(finite).mean())) if finite.size else math.nan
                lines.append(f"| {measure} | {branch} | {last[0]:.3g} | {last[-1]:.3g} | {gm:.3g} |")
        lines += ["", "(values at the last probe step; the heatmap `laziness_by_layer.png` shows every step)", ""]
    lines += _linearized_lines(ds)
    lines += ["A verdict (lazy or complete) needs the slope of these measures over depth, from a depth sweep "
              "of this configuration:", "", "```", sweep_command(ds), "```", "",
              "then `diagnose report` and `diagnose conform` on the sweep dir.", ""]
    return lines


def _linearized_lines(ds: xr.Dataset) -> list[str]:
    """The block-linearized model's losses at its steps (linearized.zarr), as a markdown table."""
    from pathlib import Path

    from probes import schema

    run_dir = next((str(v) for v in ds["run_dir"].values.ravel() if isinstance(v, str) and v), "")
    store = Path(run_dir) / schema.LINEARIZED_STORE_NAME
    if not run_dir or not store.is_dir():
        return []
    with xr.open_dataset(store, engine="zarr", chunks=None) as lin:
        lin = lin.load().sortby("step")
    lines = ["Loss-level laziness: the block-linearized model (every branch F(h;θ_0) + J F(h;θ_0)(θ_t − θ_0)) "
             "on held-out sequences. Share = (init − linearized) / (init − model): 1 means the lazy surrogate "
             "explains all the learning; the blocks' share takes the model with every branch frozen at θ_0 as "
             "reference instead of the initial model.", "",
             "| step | init loss | model loss | linearized loss | share | blocks' share |", "|---|---|---|---|---|---|"]
    for step in lin["step"].values:
        r = lin.sel(step=step)
        blocks = float(r["linearized_blocks_share"]) if "linearized_blocks_share" in r else math.nan
        lines.append(f"| {int(step)} | {float(r['linearized_init_loss']):.4f} | {float(r['linearized_model_loss']):.4f}"
                     f" | {float(r['linearized_loss']):.4f} | {float(r['linearized_share']):.3f} | {blocks:.3f} |")
    return lines + [""]

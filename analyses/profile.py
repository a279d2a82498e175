"""Feature-learning profile: which layers learn, when, and how evenly.

Three views of one run (or one sweep cell, averaged over seeds):
- `layer_step_table`: a layer × step table of a per-layer record, by default `delta0_rms` (RMS of
  h(t) − h(0) on the probe batch, activation units) at a `*_add` site (what a branch adds to the
  stream) or a stream site (`resid_*`). The data behind the heatmap figure.
- `learning_shares`: each layer's share of the change of the final stream since step 0
  (`final_update_share`: <Δ(attn_add + mlp_add), Δh_final> / ‖Δh_final‖²; with the embedding's
  share they sum to 1).
- `concentration`: how evenly that learning is spread over layers, as two numbers in [0, 1]:
  * `entropy_norm` = H(p) / log(L), with p the layer shares' positive parts normalized to sum 1:
    1 when every layer carries the same share, 0 when one layer carries all of it;
  * `frac_layers_50` = the smallest fraction of layers (largest shares first) that together hold
    half of the total: about 0.5 for an even spread, 1/L when one layer dominates.
  Negative shares (a layer whose change points against the final stream's change) are clipped to
  0: they add no learning to the final update, and negative weights have no entropy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import xarray as xr

from analyses.load import SWEEP_DIMS, as_sweep, sort_by_param
from probes.schema import STREAM_SITES

_COMPONENT_DIMS = ("site", "branch", "block_role")


def select_run(ds: xr.Dataset, average_seeds: bool = True, **sel) -> xr.Dataset:
    """Reduce a sweep to one cell: `sel` picks sweep coordinates, seeds are averaged (mean).

    A one-run Dataset passes through. Raises ValueError naming the sweep dims that still vary
    (pass them as keyword arguments, e.g. `select_run(ds, param="alpha=1", depth=8)`).
    """
    ds = as_sweep(ds).sel(sel)
    if average_seeds and "seed" in ds.dims:
        ds = ds.drop_vars(["run_dir", "state"], errors="ignore").mean("seed", skipna=True, keep_attrs=True)
    varying = [d for d in SWEEP_DIMS if d in ds.dims and ds.sizes[d] > 1]
    if varying:
        raise ValueError(f"select one run: the sweep still varies {', '.join(varying)} (pass them as keywords)")
    return ds.squeeze([d for d in SWEEP_DIMS if d in ds.dims], drop=False)


def layer_step_table(ds: xr.Dataset, variable: str = "delta0_rms", component: str | None = "mlp_add") -> pd.DataFrame:
    """A layer × step table (index: layer, columns: probe step) of a per-layer `variable` of one run.

    `component` picks the site / branch / block role for variables that have one (ignored
    otherwise). `ds` is one run or a sweep cell reachable with `select_run` defaults.
    """
    da = select_run(ds)[variable]
    extra = [d for d in da.dims if d in _COMPONENT_DIMS]
    if extra:
        da = da.sel({extra[0]: component})
    # Layers above this run's depth and steps it did not probe are NaN padding from the sweep's join.
    da = da.dropna("layer", how="all").dropna("step", how="all")
    return da.transpose("layer", "step").to_pandas()


def feature_update_tables(
    ds: xr.Dataset, sites: tuple[str, ...] = ("attn_add", "mlp_add", *STREAM_SITES), variable: str = "delta0_rms"
) -> dict[str, pd.DataFrame]:
    """`layer_step_table` for each site: what each branch adds (`*_add`) and the stream (`resid_*`).

    A site the model does not have is left out: `resid_mid` of a parallel-residual model (GPT-NeoX),
    whose records are all NaN.
    """
    tables = {site: layer_step_table(ds, variable, site) for site in sites}
    return {site: table for site, table in tables.items() if table.notna().to_numpy().any()}


def learning_shares(ds: xr.Dataset, step: int | None = None) -> pd.DataFrame:
    """Each layer's share of the final-stream update at `step` (default: the last probe step).

    Returns columns layer, share; attrs["embed_share"] holds the embedding's share and
    attrs["step"] the step used.
    """
    run = select_run(ds)
    share = run["final_update_share"].dropna("layer", how="all").dropna("step", how="all")
    if step is None:
        step = int(share["step"].values[-1])
    out = share.sel(step=step).to_dataframe(name="share").reset_index()[["layer", "share"]]
    out.attrs["step"] = step
    if "embed_update_share" in run:
        out.attrs["embed_share"] = float(run["embed_update_share"].sel(step=step))
    return out


def concentration(shares) -> dict[str, float]:
    """entropy_norm and frac_layers_50 (see module doc) of per-layer shares; NaN shares are ignored.

    Both are NaN when no layer has a positive share; entropy_norm is NaN for a single layer
    (log 1 = 0), where frac_layers_50 is 1.
    """
    s = np.asarray(shares, dtype=np.float64)
    s = s[np.isfinite(s)]
    n = s.size
    pos = np.clip(s, 0.0, None)
    total = pos.sum()
    if n == 0 or total <= 0:
        return {"entropy_norm": math.nan, "frac_layers_50": math.nan, "n_layers": n}
    p = pos / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    cum = np.cumsum(np.sort(p)[::-1])
    k = int(np.searchsorted(cum, 0.5 - 1e-12) + 1)  # first k whose cumulative share reaches one half
    return {
        "entropy_norm": entropy / math.log(n) if n > 1 else math.nan,
        "frac_layers_50": k / n,
        "n_layers": n,
    }


def concentration_table(ds: xr.Dataset, step: int | None = None) -> pd.DataFrame:
    """`concentration` of `final_update_share` for every run of a sweep at `step` (default: each run's last).

    Returns columns param, alpha, depth, width, seed, lr, step, embed_share, entropy_norm,
    frac_layers_50, n_layers.
    """
    ds = as_sweep(ds)
    keys = list(SWEEP_DIMS)
    frame = ds["final_update_share"].to_dataframe(name="share").reset_index().dropna(subset=["share"])
    last = frame.groupby(keys)["step"].transform("max") if step is None else step
    frame = frame[frame["step"] == last]
    if "embed_update_share" in ds:
        embed = ds["embed_update_share"].to_dataframe(name="embed_share").reset_index()
        frame = frame.merge(embed[[*keys, "step", "embed_share"]], on=[*keys, "step"], how="left")
    else:
        frame["embed_share"] = math.nan
    rows = []
    for key, group in frame.groupby([*keys, "step"], sort=False):
        rows.append(dict(zip([*keys, "step"], key), alpha=group["alpha"].iloc[0],
                         embed_share=group["embed_share"].iloc[0]) | concentration(group["share"].to_numpy()))
    cols = [*keys, "alpha", "step", "embed_share", "entropy_norm", "frac_layers_50", "n_layers"]
    if not rows:
        return pd.DataFrame(columns=cols)
    return sort_by_param(pd.DataFrame(rows)[cols], "depth", "width", "lr", "seed")

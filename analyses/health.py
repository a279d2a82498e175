"""Training health from the probe records: attention-logit growth, ε-dominance, spikes, and the lead/lag
of a replayed spike across layers and signals. Torch-free.

Spike forensics (`spike_report`, on the dense records of `diagnose replay`): every signal of
`SPIKE_SIGNALS` is a (layer × step) table; each (signal, layer) series gets a robust z-score on a log
scale against its own baseline, the replayed steps up to `spike_step − guard`:

    z_t = (log x_t − median_baseline(log x)) / max(1.4826 · MAD_baseline(log x), MIN_SCALE)

Its *onset* is the first step after the baseline with |z| > threshold. Sorting (signal, layer) by
onset, then by |z| at the onset, says which layers' and which signals' excursions came first. The
guard (2) keeps the update that made the spiking loss (step S − 1 for a loss spike recorded at S)
out of the baseline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from analyses.load import SWEEP_DIMS, list_runs, load_metrics, open_run

# name → (variable, selection, dims reduced by max). Per-layer signals for the lead/lag analysis.
SPIKE_SIGNALS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "update_rel": ("update_rel", {"block_role": "hidden_weight"}, ()),
    "update_spectral_rel": ("update_spectral_rel", {}, ("matrix",)),
    "grad_rms": ("grad_rms", {}, ()),
    "adam_m_norm": ("adam_m_norm", {"block_role": "hidden_weight"}, ()),
    "adam_v_norm": ("adam_v_norm", {"block_role": "hidden_weight"}, ()),
    "act_absmax": ("act_absmax", {"site": "resid_post"}, ()),
    "act_rms": ("act_rms", {"site": "resid_post"}, ()),
    "delta_prev_rms": ("delta_prev_rms", {"site": "resid_post"}, ()),
    "attn_max_logit": ("attn_max_logit", {}, ("head",)),
    "attn_entropy": ("attn_entropy", {}, ("head",)),
}
MIN_SCALE = 0.05  # smallest robust σ of log x in the spike z-score: a 5% change
THRESHOLD = 5.0  # |z| above which a series has left its baseline
GUARD = 2  # baseline: replayed steps ≤ spike_step − GUARD


def signal_tables(ds: xr.Dataset) -> dict[str, pd.DataFrame]:
    """SPIKE_SIGNALS present in `ds` (one run) → DataFrame (index layer, columns step)."""
    out = {}
    for name, (var, sel, reduce) in SPIKE_SIGNALS.items():
        if var not in ds:
            continue
        da = ds[var].sel(sel) if sel else ds[var]
        for dim in reduce:
            if dim in da.dims:
                da = da.max(dim)
        if set(da.dims) == {"step", "layer"}:
            out[name] = da.transpose("layer", "step").to_pandas()
    return out


def robust_z(table: pd.DataFrame, baseline: list) -> pd.DataFrame:
    """Robust z of log|x| of each row against its values at the `baseline` columns (see module doc)."""
    logx = np.log(np.abs(table.astype(float)).clip(lower=1e-30))
    base = logx[baseline]
    median = base.median(axis=1)
    mad = base.sub(median, axis=0).abs().median(axis=1)
    scale = np.maximum(1.4826 * mad, MIN_SCALE)
    return logx.sub(median, axis=0).div(scale, axis=0)


def _baseline(steps: list[int], spike_step: int, guard: int) -> list[int]:
    """Replayed steps ≤ spike_step − guard, except the first: its `delta_prev_rms` is measured against
    the original run's last probe step before the checkpoint, not against the step before it."""
    return [s for s in steps[1:] if s <= spike_step - guard]


def lead_lag(ds: xr.Dataset, spike_step: int, guard: int = GUARD, threshold: float = THRESHOLD) -> pd.DataFrame:
    """One row per (signal, layer) that left its baseline: onset step, z at the onset, peak |z| and its
    step; sorted by onset, then by |z| at the onset (largest first)."""
    steps = [int(s) for s in ds.step.values]
    baseline = _baseline(steps, spike_step, guard)
    if len(baseline) < 2:
        raise ValueError(f"the replay has {len(baseline)} step(s) before step {spike_step - guard + 1}; "
                         "replay with a longer lead for a baseline")
    rows = []
    for name, table in signal_tables(ds).items():
        z = robust_z(table, baseline)
        after = z[[s for s in steps if s > spike_step - guard]]
        for layer, series in after.iterrows():
            big = series[series.abs() > threshold]
            if big.empty:
                continue
            onset = int(big.index[0])
            peak = int(series.abs().idxmax())
            rows.append({"signal": name, "layer": int(layer), "onset": onset, "z_onset": float(series[onset]),
                         "peak_step": peak, "z_peak": float(series[peak])})
    df = pd.DataFrame(rows, columns=["signal", "layer", "onset", "z_onset", "peak_step", "z_peak"])
    if df.empty:
        return df
    df["_abs"] = -df["z_onset"].abs()
    return df.sort_values(["onset", "_abs"], kind="stable").drop(columns="_abs").reset_index(drop=True)


def spike_report(ds: xr.Dataset, spike_step: int, guard: int = GUARD, threshold: float = THRESHOLD) -> dict:
    """The lead/lag of a replayed spike: {"spike_step", "onset_step" (earliest excursion, None if none),
    "first_signals", "first_layers" (at the onset step, by |z|), "layer_onsets" {layer: step},
    "signal_onsets" {signal: step}, "table" (lead_lag)}."""
    table = lead_lag(ds, spike_step, guard, threshold)
    report = {"spike_step": spike_step, "onset_step": None, "first_signals": [], "first_layers": [],
              "layer_onsets": {}, "signal_onsets": {}, "table": table, "guard": guard, "threshold": threshold}
    if table.empty:
        return report
    onset = int(table["onset"].min())
    first = table[table["onset"] == onset]
    report["onset_step"] = onset
    report["first_signals"] = list(dict.fromkeys(first["signal"]))
    report["first_layers"] = list(dict.fromkeys(int(v) for v in first["layer"]))
    report["layer_onsets"] = {int(k): int(v) for k, v in table.groupby("layer")["onset"].min().items()}
    report["signal_onsets"] = {k: int(v) for k, v in table.groupby("signal")["onset"].min().items()}
    return report


def spike_figure(ds: xr.Dataset, report: dict):
    """One heatmap per signal: robust z (layer × step), the spike step marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import seaborn as sns
    from matplotlib.figure import Figure

    tables = signal_tables(ds)
    baseline = _baseline([int(s) for s in ds.step.values], report["spike_step"], report["guard"])
    n = len(tables)
    cols = min(n, 3) or 1
    rows = math.ceil(n / cols) or 1
    fig = Figure(figsize=(4.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, table) in zip(axes, tables.items()):
        z = robust_z(table, baseline).clip(-20, 20)
        sns.heatmap(z, ax=ax, cmap="RdBu_r", center=0, vmin=-20, vmax=20, cbar=ax is axes[min(n, cols) - 1])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        if report["spike_step"] in table.columns:
            x = list(table.columns).index(report["spike_step"]) + 0.5
            ax.axvline(x, color="k", lw=1, ls="--")
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"Robust z vs the baseline (steps ≤ {report['spike_step'] - report['guard']}); "
                 f"dashed: spike step {report['spike_step']}", fontsize=10)
    return fig


def spike_markdown(report: dict, replay: dict | None = None) -> str:
    """The spike report as markdown."""
    lines = [f"# Spike report: step {report['spike_step']}", ""]
    if replay:
        lines += [f"Replayed steps {replay['start']}–{replay['stop'] - 1} from "
                  f"{'the checkpoint at step ' + str(replay['start']) if replay['start'] else 'initialization'}"
                  f" with probes at every step; training bitwise the same as the original run: "
                  f"{ {True: 'yes', False: 'NO', None: 'not checked (no original metrics)'}[replay['bitwise']] }"
                  f" ({len(replay['compared'])} steps compared).", ""]
        if replay.get("error"):
            lines += [f"The replay ended early: {replay['error']}.", ""]
    lines += [f"Rule: robust z of log x per (signal, layer) against the replayed steps ≤ "
              f"{report['spike_step'] - report['guard']}; an excursion is |z| > {report['threshold']:g}.", ""]
    if report["onset_step"] is None:
        lines += ["No signal left its baseline.", ""]
        return "\n".join(lines)
    lines += [f"**Earliest excursion: step {report['onset_step']}**, in "
              f"{', '.join(report['first_signals'])}; first layers to move (by |z| at that step): "
              f"{', '.join(map(str, report['first_layers']))}.", "",
              "Onset per layer (earliest over signals): "
              + ", ".join(f"layer {k}: {v}" for k, v in sorted(report["layer_onsets"].items())) + ".", "",
              "Onset per signal (earliest over layers): "
              + ", ".join(f"{k}: {v}" for k, v in sorted(report["signal_onsets"].items(), key=lambda kv: kv[1])) + ".",
              "", "| signal | layer | onset | z at onset | peak step | peak z |", "|---|---|---|---|---|---|"]
    for r in report["table"].itertuples(index=False):
        lines.append(f"| {r.signal} | {r.layer} | {r.onset} | {r.z_onset:.1f} | {r.peak_step} | {r.z_peak:.1f} |")
    return "\n".join(lines + [""])


def write_spike_report(replay_dir: str | os.PathLike, spike_step: int, replay: dict | None = None,
                       dpi: int = 110) -> dict:
    """spike_report.md, spike_report.json and spike_report.png in the replay dir; returns the report."""
    replay_dir = Path(replay_dir)
    ds = open_run(replay_dir)
    report = spike_report(ds, spike_step)
    (replay_dir / "spike_report.md").write_text(spike_markdown(report, replay))
    fig = spike_figure(ds, report)
    fig.savefig(replay_dir / "spike_report.png", dpi=dpi)
    as_json = {k: v for k, v in report.items() if k != "table"}
    as_json["table"] = report["table"].to_dict(orient="records")
    if replay:
        as_json["replay"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in replay.items()}
    (replay_dir / "spike_report.json").write_text(json.dumps(as_json, indent=2))
    return report


# --- the report's training-health section ------------------------------------------------------------
def _cells(ds: xr.Dataset):
    for r in list_runs(ds).itertuples(index=False):
        yield r, ds.sel({d: getattr(r, d) for d in SWEEP_DIMS if d in ds.dims})


def attention_growth(ds: xr.Dataset) -> pd.DataFrame:
    """Per run: the largest attention logit (over layers and heads) at the first and last probe steps,
    its growth (last / first), the deepest layer's, and the mean normalized entropy at the end."""
    rows = []
    for r, cell in _cells(ds):
        if "attn_max_logit" not in cell:
            continue
        logit = cell["attn_max_logit"].dropna("step", how="all")
        if logit.sizes["step"] == 0:
            continue
        first, last = logit.isel(step=0).max().item(), logit.isel(step=-1).max().item()
        deepest = logit.isel(step=-1).dropna("layer", how="all").isel(layer=-1).max().item()
        ent = cell["attn_entropy_norm"].dropna("step", how="all").isel(step=-1).mean().item()
        rows.append({"param": r.param, "alpha": r.alpha, "depth": r.depth, "width": r.width, "lr": r.lr,
                     "seed": r.seed, "max_logit_first": first, "max_logit_last": last, "growth": last / first,
                     "last_layer_max_logit": deepest, "entropy_norm_last": ent})
    return pd.DataFrame(rows)


def eps_dominance(ds: xr.Dataset) -> pd.DataFrame:
    """Per run and role: the ε-dominance share at the last probe step (block roles: mean over layers)."""
    rows = []
    for r, cell in _cells(ds):
        if "adam_eps_dominance" not in cell:
            continue
        last = cell.dropna("step", how="all", subset=["adam_eps_dominance"]).isel(step=-1)
        row = {"param": r.param, "alpha": r.alpha, "depth": r.depth, "width": r.width, "seed": r.seed}
        for role in last.block_role.values:
            row[str(role)] = float(last["adam_eps_dominance"].sel(block_role=role).mean())
        for role in last.global_role.values:
            row[str(role)] = float(last["global_adam_eps_dominance"].sel(global_role=role))
        rows.append(row)
    return pd.DataFrame(rows)


def spikes(ds: xr.Dataset) -> pd.DataFrame:
    """Spike episodes the trainer's detector marked in each run's metrics.jsonl (trainer/spikes.py's rule):
    runs of consecutive marked steps, one row each: first and last step, the signals, the loss at the
    first step and the largest loss of the episode."""
    columns = ["param", "depth", "width", "seed", "step", "until", "signals", "loss", "max_loss"]
    rows = []
    for r in list_runs(ds).itertuples(index=False):
        metrics = load_metrics(r.run_dir)
        if "spike" not in metrics:
            continue
        marked = metrics.dropna(subset=["spike"])
        episode = (marked["step"].diff() != 1).cumsum()
        for _, ep in marked.groupby(episode):
            signals = sorted({s for listed in ep["spike"] for s in listed})
            rows.append({"param": r.param, "depth": r.depth, "width": r.width, "seed": r.seed,
                         "step": int(ep["step"].iloc[0]), "until": int(ep["step"].iloc[-1]),
                         "signals": ", ".join(signals), "loss": float(ep["loss"].iloc[0]),
                         "max_loss": float(ep["loss"].max())})
    return pd.DataFrame(rows, columns=columns)


def health_markdown(ds: xr.Dataset) -> list[str]:
    """The report's "Training health" section (markdown lines; empty when the runs have no health records)."""
    from analyses.report import markdown_table

    attention, eps, marked = attention_growth(ds), eps_dominance(ds), spikes(ds)
    if attention.empty and eps.empty and marked.empty:
        return []
    lines = ["## Training health", ""]
    if not attention.empty:
        lines += ["Attention: the largest pre-softmax logit (after the scale; over layers and heads) at the first and "
                  "last probe steps, its growth, the last layer's, and the mean entropy / log(context) at the end.",
                  "", markdown_table(attention.sort_values(["param", "depth", "seed"])), ""]
    if not eps.empty:
        lines += ["Adam ε-dominance at the last probe step: the share of coordinates where ε ≥ √v̂ (ε, not the "
                  "gradient, sets the step), per role (block roles: mean over layers).", "",
                  markdown_table(eps.sort_values(["param", "depth", "seed"])), ""]
    if marked.empty:
        lines += ["Spikes: none marked in metrics.jsonl (rule: robust z of log loss or log grad norm over the "
                  "trailing 50 steps > 6; trainer/spikes.py).", ""]
    else:
        lines += ["Spike episodes marked in metrics.jsonl (robust z of log loss or log grad norm over the trailing "
                  "50 steps > 6; trainer/spikes.py; `until`: the last consecutive marked step). Explain one with "
                  "`diagnose replay RUN --step S`.", "",
                  markdown_table(marked), ""]
    return lines


HEALTH_PANELS: dict[str, tuple[str, dict, str, str]] = {
    # name → (variable, selection, reduction over the non-layer dim, y label)
    "attention max logit": ("attn_max_logit", {}, "max", "max logit"),
    "attention entropy / log(context)": ("attn_entropy_norm", {}, "mean", "normalized entropy"),
    "kurtosis of the stream": ("act_kurtosis", {"site": "resid_post"}, "", "kurtosis"),
    "spectral update ‖ΔW‖₂/‖W‖₂": ("update_spectral_rel", {}, "max", "max over matrices"),
}


def health_figure(runs: dict[str, xr.Dataset], panels: dict | None = None):
    """Runs side by side (columns) on the health signals (rows): one line per layer over the probe steps,
    darker = deeper."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = panels or HEALTH_PANELS
    fig = Figure(figsize=(4.0 * len(runs), 2.5 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), len(runs), squeeze=False, sharey="row")
    cmap = colormaps["viridis_r"]
    for col, (label, ds) in enumerate(runs.items()):
        for row, (title, (var, sel, reduce, ylabel)) in enumerate(panels.items()):
            ax = axes[row, col]
            if var not in ds:
                ax.axis("off")
                continue
            da = ds[var].sel(sel) if sel else ds[var]
            other = [d for d in da.dims if d not in ("step", "layer")]
            if other and reduce:
                da = getattr(da, reduce)(other)
            depth = da.sizes["layer"]
            for layer in range(depth):
                series = da.isel(layer=layer)
                ax.plot(series["step"], series, color=cmap((layer + 1) / depth), lw=1)
            ax.set_title(f"{label}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(ylabel)
            if var == "update_spectral_rel":
                ax.set_yscale("log")
    return fig

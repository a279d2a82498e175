"""Each figure function returns a Figure that renders to PNG, with one panel per param/branch/site."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from analyses import coordcheck, figures, laziness, profile, transfer


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


def test_lin_ratio_figure_has_a_panel_per_branch_and_slopes_in_legend(depth_ds):
    slopes = laziness.laziness(depth_ds, n_boot=50)
    fig = figures.lin_ratio_figure(laziness.ratio_table(depth_ds), slopes)
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 3 and labels[1].startswith("alpha=0.5: slope -0.5") and "theory -0.50" in labels[1]
    assert _png(fig).startswith(b"\x89PNG")


def test_coord_check_figures(depth_ds, width_ds):
    table, _ = coordcheck.depth_coord_check(depth_ds)
    fig = figures.depth_coord_check_figure(table)
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) >= 6  # one line per probe step
    _png(fig)
    wtable, _ = coordcheck.width_coord_check(width_ds)
    fig = figures.width_coord_check_figure(wtable, component="attn_add")
    assert [ax.get_title() for ax in fig.axes] == ["sp", "mup"]
    _png(fig)
    with pytest.raises(ValueError, match="no rows for component"):
        figures.width_coord_check_figure(wtable, component="nowhere")


def test_figures_refuse_mixed_cells(width_ds):
    table, _ = coordcheck.width_coord_check(width_ds)
    mixed = table.assign(lr=[1e-3, 2e-3] * (len(table) // 2))
    with pytest.raises(ValueError, match="mixes several lr"):
        figures.width_coord_check_figure(mixed)


def test_heatmap_figure(depth_ds):
    cell = depth_ds.sel(param="alpha=1", depth=8)
    tables = {site: profile.layer_step_table(cell, component=site) for site in ("attn_add", "mlp_add")}
    fig = figures.update_heatmap_figure(tables)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2  # two heatmaps (plus colour bars)
    _png(fig)
    # One colour scale spanning both panels' values; or each panel's own range.
    values = [t.where(t > 0).to_numpy(dtype=float) for t in tables.values()]
    low, high = min(np.nanmin(v) for v in values), max(np.nanmax(v) for v in values)
    for ax in panels:
        norm = ax.collections[0].norm
        assert (norm.vmin, norm.vmax) == pytest.approx((low, high))
    own = figures.update_heatmap_figure(tables, shared_scale=False)
    for ax, v in zip([ax for ax in own.axes if ax.get_title()], values):
        assert (ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) == pytest.approx((np.nanmin(v), np.nanmax(v)))
    assert values[0].max() != pytest.approx(values[1].max())  # so the two modes really differ here


def test_transfer_figure_marks_diverged_and_optima(transfer_losses):
    result = transfer.lr_transfer(transfer_losses, n_boot=20)
    fig = figures.transfer_figure(result.losses, result.optima)
    mup = next(ax for ax in fig.axes if ax.get_title() == "mup")
    markers = [line for line in mup.lines if line.get_marker() == "x"]
    assert markers, "diverged LRs are drawn as x"
    assert len([line for line in mup.lines if line.get_linestyle() == ":"]) == 3  # one optimum per depth
    _png(fig)

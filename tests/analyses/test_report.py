"""summarize / write_report / compare_runs on the synthetic sweeps."""

from __future__ import annotations

import json
import math

import pytest

from analyses import report
from analyses.load import IncompatibleRunsError
from tests.analyses.conftest import SynthRun, write_run


def test_summarize_depth_sweep(depth_ds):
    summary = report.summarize(depth_ds, n_boot=200)
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN/inf left
    assert len(summary["runs"]) == 36
    assert summary["sweep"]["param"] == ["sp", "alpha=0.5", "alpha=1"]
    lz = summary["laziness"]
    # sp is never "complete": not lazy, and unstable since its planted final stream grows with depth.
    assert {k: v["verdict"] for k, v in lz.items()} == {"sp": "not-lazy", "alpha=0.5": "lazy", "alpha=1": "complete"}
    assert {k: v["stability"] for k, v in lz.items()} == {"sp": "unstable", "alpha=0.5": "", "alpha=1": ""}
    half = lz["alpha=0.5"]
    assert half["theory"] == -0.5 and set(half["branches"]) == {"attn", "mlp"}
    mlp = half["branches"]["mlp"]
    assert mlp["ci_low"] < mlp["slope"] < mlp["ci_high"] and mlp["verdict"] == "lazy"
    assert mlp["alpha_hat_ci_low"] < mlp["alpha_hat"] < mlp["alpha_hat_ci_high"]
    assert mlp["alpha_hat"] == pytest.approx(0.5, abs=0.05) and mlp["estimator"] == "combined"
    assert mlp["alpha_hat_lin"] == pytest.approx(1 + mlp["slope"], rel=1e-12) and len(mlp["local_slopes"]) == 3
    assert mlp["nonlin_to_output"]["theory"] == -1.0
    notes = summary["laziness_notes"]
    assert notes["probe_steps"] == [1, 2, 4, 8, 16] and notes["excluded_runs"] == []
    coord = summary["depth_coord_check"]["final_abs_mean"]
    assert coord["alpha=1"][0]["init_trend"] == "shrinks" and coord["sp"][0]["trained_trend"] == "grows"
    assert "width_coord_check" not in summary and "transfer" not in summary
    assert set(summary["skipped"]) == {"width coordinate check", "transfer"}
    assert summary["concentration"]["alpha=1"][0]["depth"] == 2


def test_summarize_width_and_transfer_sweeps(width_ds, transfer_ds):
    width = report.summarize(width_ds, n_boot=50)
    act = width["width_coord_check"]["act_rms"]
    assert {r["trained_trend"] for r in act["mup"]} == {"flat"} and {r["trained_trend"] for r in act["sp"]} == {"grows"}
    tr = report.summarize(transfer_ds, n_boot=100)
    json.dumps(tr, allow_nan=False)
    assert set(tr["transfer"]) == {"mup", "alpha=1"}
    assert tr["transfer"]["mup"]["drift"][0]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert len(tr["transfer"]["alpha=1"]["optima"]) == 3
    assert "no lin_ratio" in tr["skipped"]["laziness"]


def test_write_report_depth_sweep(depth_sweep, tmp_path):
    out = report.write_report(depth_sweep, tmp_path / "rep", n_boot=100, dpi=40)
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == ["depth_coord_check.png", "feature_updates_heatmap.png", "lin_ratio_vs_depth.png",
                     "summary.json", "summary.md"]
    assert sorted(out["files"]) == sorted(str(tmp_path / "rep" / n) for n in names)
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "| alpha=0.5 | lazy |" in md and "![lin_ratio_vs_depth](lin_ratio_vs_depth.png)" in md
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["laziness"]["alpha=1"]["verdict"] == "complete"


def test_write_report_transfer_sweep_and_single_run(transfer_ds, one_run, tmp_path):
    report.write_report(transfer_ds, tmp_path / "t", n_boot=50, dpi=40)
    assert (tmp_path / "t" / "lr_transfer.png").is_file() and not (tmp_path / "t" / "lin_ratio_vs_depth.png").exists()
    out = report.write_report([one_run], one_run / "report", n_boot=50, dpi=40)
    assert sorted(p.name for p in (one_run / "report").iterdir()) == [
        "feature_updates_heatmap.png", "laziness_by_layer.png", "summary.json", "summary.md"]
    assert out["runs"][0]["run_dir"] == str(one_run) and "laziness" not in out
    # The report folder inside a run dir is not mistaken for a run.
    assert len(report.summarize(one_run)["runs"]) == 1


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Two runs recording every schema variable: CompleteP at depth 4, depth-µP at depth 16."""
    root = tmp_path_factory.mktemp("full")
    return (write_run(root / "a", SynthRun(alpha=1.0, depth=4, blocks=1)),
            write_run(root / "b", SynthRun(alpha=0.5, depth=16, blocks=1)))


def test_compare_runs(full_runs):
    a, b = full_runs
    table = report.compare_runs(a, b)
    assert table.loc["param", "a"] == "alpha=1" and table.loc["param", "b"] == "alpha=0.5"
    assert table.loc["depth", "b/a"] == 4
    assert math.isnan(table.loc["seed", "b/a"])
    # Planted lin_ratio ∝ (depth/2)^(α-1): 1 at α=1, (16/2)^-0.5 at α=0.5, times seed noise.
    assert table.loc["lin_ratio (mlp, geo-mean)", "b/a"] == pytest.approx(8**-0.5, rel=0.15)
    assert table.loc["final_val_loss", "a"] == pytest.approx(2.0, abs=1e-6)
    assert table.loc["last_train_step", "a"] == 39 and table.loc["last_probe_step", "a"] == 16
    assert {"final_rms (last step)", "delta0_rms mlp_add (last step, layer mean)",
            "update entropy_norm (last step)"} <= set(table.index)


def test_compare_runs_refuses_different_variables(full_runs, tmp_path):
    other = write_run(tmp_path / "few", SynthRun(blocks=1, variables=("lin_ratio", "final_rms")))
    message = r"only in .*: act_rms, attn_pattern_change, branch_norm.*\(\+\d+ more\)"
    with pytest.raises(IncompatibleRunsError, match=message):
        report.compare_runs(full_runs[0], other)


def test_markdown_table():
    import pandas as pd

    md = report.markdown_table(pd.DataFrame({"a": [1.23456789, math.nan], "b": ["x|y", None]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1.235 | x/y |", "| – | – |"]

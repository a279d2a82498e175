"""Lead/lag of a spike on records with known onsets, and the report's training-health section (no torch)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analyses import health

STEPS = list(range(10, 30))


def _records(onsets: dict[int, int], jump: float = 10.0) -> xr.Dataset:
    """update_rel (step, layer, block_role) with 2% noise; layer l jumps by `jump` from step onsets[l]."""
    rng = np.random.default_rng(0)
    depth = 4
    values = 1e-3 * np.exp(0.02 * rng.standard_normal((len(STEPS), depth, 3)))
    for layer, onset in onsets.items():
        values[[s >= onset for s in STEPS], layer, :] *= jump
    grad = np.exp(0.02 * rng.standard_normal((len(STEPS), depth)))
    return xr.Dataset({"update_rel": (("step", "layer", "block_role"), values),
                       "grad_rms": (("step", "layer"), grad)},
                      coords={"step": STEPS, "layer": range(depth),
                              "block_role": ["block_norm", "hidden_weight", "hidden_bias"]})


def test_lead_lag_orders_layers_by_onset_then_size():
    ds = _records({2: 21, 0: 23, 3: 21})
    ds["update_rel"][dict(step=STEPS.index(21), layer=3)] *= 3  # layer 3 moves more at the same step
    report = health.spike_report(ds, spike_step=22)
    assert report["onset_step"] == 21 and report["first_signals"] == ["update_rel"]
    assert report["first_layers"] == [3, 2]
    assert report["layer_onsets"] == {0: 23, 2: 21, 3: 21}
    assert "grad_rms" not in report["signal_onsets"]  # noise alone never crosses the threshold
    table = report["table"]
    assert list(table["layer"]) == [3, 2, 0] and (table["z_onset"] > health.THRESHOLD).all()


def test_a_move_inside_the_baseline_is_not_an_onset():
    ds = _records({1: 15})
    report = health.spike_report(ds, spike_step=25)
    assert report["onset_step"] is None and report["table"].empty
    assert "No signal left its baseline" in health.spike_markdown(report)


def test_too_short_a_baseline_is_refused():
    with pytest.raises(ValueError, match="longer lead"):
        health.spike_report(_records({}), spike_step=12)


def test_robust_z_matches_a_direct_computation():
    ds = _records({2: 21})
    table = health.signal_tables(ds)["update_rel"]
    baseline = [s for s in STEPS[1:] if s <= 19]
    z = health.robust_z(table, baseline)
    logs = np.log(table.loc[2, baseline].to_numpy())
    med = np.median(logs)
    scale = max(1.4826 * np.median(np.abs(logs - med)), health.MIN_SCALE)
    assert z.loc[2, 25] == pytest.approx((np.log(table.loc[2, 25]) - med) / scale)


def test_report_has_a_training_health_section_only_when_there_are_health_records(tmp_path):
    from analyses import report
    from tests.analyses.conftest import SynthRun, write_run

    runs = [write_run(tmp_path / f"a{a}", SynthRun(alpha=a, depth=8, health=True)) for a in (0.5, 1.0)]
    report.write_report(runs, tmp_path / "rep", n_boot=20, dpi=30)
    md = (tmp_path / "rep" / "summary.md").read_text()
    section = md.split("## Training health", 1)[1].split("\n## ", 1)[0]
    growth = health.attention_growth(report._open(runs))
    # The synthetic logits grow by 10% per layer and stay flat in time: growth 1, last layer 1.7.
    assert sorted(growth["alpha"]) == [0.5, 1.0] and np.allclose(growth["growth"], 1.0)
    assert np.allclose(growth["last_layer_max_logit"], 1.7)
    assert "| alpha=0.5 |" in section and "ε-dominance" in section and "Spikes: none marked" in section
    plain = write_run(tmp_path / "plain", SynthRun(depth=4))  # a store from before the health probes
    report.write_report([plain], tmp_path / "rep2", n_boot=20, dpi=30)
    assert "## Training health" not in (tmp_path / "rep2" / "summary.md").read_text()

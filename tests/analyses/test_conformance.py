"""`diagnose conform` on real tiny sweeps: correct parameterizations conform, broken ones fail on the
row that should catch them. The sweeps are trained here (width 32-128, depth 2-8, 16 steps, 2 seeds;
about 10 s a sweep), all in the default suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from analyses import theory
from analyses.conformance import conformance, quantity_table, status
from analyses.load import open_sweep
from tests.conform_sweeps import tiny_sweep


def _rows(table, quantity, axis="depth", component="-"):
    return table[(table["quantity"] == quantity) & (table["axis"] == axis) & (table["component"] == component)]


def test_theory_table_matches_the_parameterization_rules():
    from trainer.parameterization import Parameterization, Role

    # The update-size exponents are those of Table 1's group LRs, read from the trainer's own table.
    for name, alpha in (("sp", 1.0), ("mup", 1.0), ("alpha", 0.5), ("alpha", 0.75), ("alpha", 1.0)):
        def lr(depth, width, role, name=name, alpha=alpha):
            return Parameterization(name=name, alpha=alpha, depth=depth, width=width).rule(role).lr

        for role in (Role.HIDDEN_WEIGHT, Role.HIDDEN_BIAS, Role.BLOCK_NORM):
            depth_exp = math.log(lr(16, 256, role) / lr(4, 256, role)) / math.log(4)
            width_exp = math.log(lr(2, 1024, role) / lr(2, 256, role)) / math.log(4)
            assert theory.predicted_exponent(name, alpha, "update_rms", "depth", role.value) == pytest.approx(depth_exp)
            assert theory.predicted_exponent(name, alpha, "update_rms", "width", role.value) == pytest.approx(width_exp)
        mult = Parameterization(name=name, alpha=alpha, depth=16).branch_multiplier / \
            Parameterization(name=name, alpha=alpha, depth=4).branch_multiplier
        assert theory.predicted_exponent(name, alpha, "branch_add_init", "depth") == pytest.approx(math.log(mult) /
                                                                                                  math.log(4))
    assert theory.predicted_exponent("alpha", 0.5, "lin_ratio", "depth") == -0.5
    assert theory.predicted_exponent("alpha", 0.5, "1-feature_cka", "depth") == -1.0
    assert theory.predicted_exponent("sp", math.nan, "stream_change", "depth") == 1.0
    rows = theory.prediction_table()
    assert {r["quantity"] for r in rows} == set(theory.QUANTITIES)


def test_status_rules():
    assert status(0.0, -0.1, 0.1, 0.0, 0.2, 3)[0] == "pass"
    assert status(-0.6, -0.7, -0.5, 0.0, 0.2, 3)[0] == "fail"
    assert status(0.0, -0.5, 0.5, 0.0, 0.2, 3)[0] == "inconclusive"  # too wide
    assert status(0.0, -0.1, 0.1, 0.0, 0.2, 2)[0] == "inconclusive"  # two depths
    assert status(0.0, np.nan, np.nan, 0.0, 0.2, 3)[0] == "inconclusive"  # one seed
    # An asymptotic exponent approached from its floor is not a failure, overshooting the floor is.
    assert status(-0.05, -0.06, -0.04, -0.5, 0.2, 3, floor=0.0)[0] == "inconclusive"
    assert status(0.5, 0.45, 0.55, -0.5, 0.2, 3, floor=0.0)[0] == "fail"


@pytest.fixture(scope="module")
def completep_sweep(tmp_path_factory):
    return tiny_sweep(tmp_path_factory.mktemp("completep"))


def test_completep_sweep_conforms_and_cli_reports_json(completep_sweep):
    table = conformance(open_sweep(completep_sweep), n_boot=200)
    assert not table.empty and (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    assert (table["status"] == "pass").sum() >= 12
    proc = subprocess.run([sys.executable, "-m", "diagnose", "conform", str(completep_sweep), "--json",
                           "--n-boot", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    keys = {"quantity", "axis", "param", "measured", "ci_low", "ci_high", "predicted", "status"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {r["status"] for r in rows} <= {"pass", "inconclusive"}
    assert any(r["quantity"] == "update_rms[hidden_weight]" and r["status"] == "pass" for r in rows)


def test_missing_branch_multiplier_fails_on_branch_add_and_stream_rows(tmp_path):
    root = tiny_sweep(tmp_path, ablate="no-branch-multiplier")
    table = conformance(open_sweep(root), n_boot=200)
    assert (_rows(table, "branch_add_init", component="mlp_add")["status"] == "fail").all()
    assert (_rows(table, "stream_change")["status"] == "fail").all()  # the stream's change grows ∝ L
    proc = subprocess.run([sys.executable, "-m", "diagnose", "conform", str(root), "--n-boot", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "failing:" in proc.stdout and "branch_add_init[mlp_add] (depth, alpha=1)" in proc.stdout


def test_conform_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diagnose", "conform", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_depth_mup_sweep_conforms(tmp_path):
    table = conformance(open_sweep(tiny_sweep(tmp_path, alpha=0.5)), n_boot=200)
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    for quantity, component in (("update_rms", "hidden_weight"), ("feature_change", "mlp"), ("lin_ratio", "mlp"),
                                ("branch_add_init", "mlp_add")):
        assert (_rows(table, quantity, component=component)["status"] == "pass").all(), quantity


def test_cka_row_uses_only_the_steps_where_every_run_is_perturbative(completep_sweep):
    # Recomputed from the run stores directly: the probe steps ≥ 1 at which every run's δ of the MLP
    # (geometric mean over layers) is below theory.DELTA_MAX, and 1 − CKA's geometric mean over them.
    stores = {run.name: xr.open_zarr(run / "probes.zarr").load() for run in sorted(completep_sweep.iterdir())}
    steps = stores[next(iter(stores))]["step"].values[1:]
    worst = np.max([np.exp(np.log(ds["feature_change"].sel(branch="mlp", step=steps)).mean("layer")).values
                    for ds in stores.values()], axis=0)
    window = steps[worst < theory.DELTA_MAX]
    assert 0 < len(window) < len(steps)  # the runs leave the expansion's regime within 16 steps
    table = quantity_table(open_sweep(completep_sweep), theory.QUANTITIES["1-feature_cka"])
    for name, ds in stores.items():
        expected = np.exp(np.log(1 - ds["feature_cka"].sel(branch="mlp", step=window)).mean())
        depth, seed = int(name.split("_")[0][1:]), int(name.split("_s")[1])
        row = table[(table["depth"] == depth) & (table["seed"] == seed) & (table["branch"] == "mlp")]
        assert float(row["value"].iloc[0]) == pytest.approx(float(expected), rel=1e-5), name  # float32 records


def test_missing_depth_lr_factor_fails_on_update_size(tmp_path):
    table = conformance(open_sweep(tiny_sweep(tmp_path, alpha=0.5, ablate="no-depth-lr")), n_boot=200)
    for role in ("hidden_weight", "hidden_bias", "block_norm"):
        assert (_rows(table, "update_rms", component=role)["status"] == "fail").all()


def test_sp_init_under_mup_lrs_fails_on_width_rows(tmp_path):
    table = conformance(open_sweep(tiny_sweep(tmp_path, param="mup", ablate="sp-init", depths=(2,),
                                              widths=(32, 64, 128))), n_boot=200)
    assert (_rows(table, "update_rel", axis="width", component="hidden_weight")["status"] == "fail").all()
    assert (_rows(table, "branch_add_init", axis="width", component="mlp_add")["status"] == "fail").all()


def test_mup_width_sweep_conforms(tmp_path):
    table = conformance(open_sweep(tiny_sweep(tmp_path, param="mup", depths=(2,), widths=(32, 64, 128))), n_boot=200)
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()


def test_global_eps_fails_on_update_size_once_eps_matters(tmp_path):
    # ε only matters where it is comparable to Adam's √v̂. At these shapes the check catches the unscaled
    # ε from ε_base = 1e-3 (update_rms[hidden_weight] slope −0.28 against 0), not at 1e-4 (−0.08): the
    # scan is in docs/EXPERIMENTS.md. The correctly scaled ε at 1e-3 passes (+0.08).
    broken = conformance(open_sweep(tiny_sweep(tmp_path / "broken", ablate="global-eps", eps_base=1e-3)), n_boot=200)
    assert (_rows(broken, "update_rms", component="hidden_weight")["status"] == "fail").all()
    correct = conformance(open_sweep(tiny_sweep(tmp_path / "correct", eps_base=1e-3)), n_boot=200)
    assert (_rows(correct, "update_rms", component="hidden_weight")["status"] == "pass").all()


def test_theory_agrees_with_the_laziness_verdicts_theory():
    from analyses.laziness import theory_slope

    for label, (param, alpha) in {"sp": ("sp", math.nan), "mup": ("mup", math.nan), "alpha=0.5": ("alpha", 0.5),
                                  "alpha=0.75": ("alpha", 0.75), "alpha=1": ("alpha", 1.0)}.items():
        for variable in ("lin_ratio", "nonlin_to_output"):
            assert theory.predicted_exponent(param, alpha, variable, "depth", "mlp") == theory_slope(label, variable)
    assert "| stream_change | +1 |" in theory.prediction_markdown()

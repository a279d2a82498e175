"""LR transfer: final losses from metrics, the quadratic optimum, its bootstrap interval and drift."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import load, transfer
from analyses.load import InsufficientSweepError
from probes import schema
from tests.analyses.conftest import (
    TRANSFER_DEPTHS,
    TRANSFER_DRIFT,
    TRANSFER_LOG2_LRS,
    SynthRun,
    planted_log2_lr_opt,
    write_run,
)
from trainer.observers import Observer

FEW = ("probe_loss",)


def test_final_loss_sources(tmp_path):
    val = transfer.final_loss(write_run(tmp_path / "v", SynthRun(final_loss=1.5, blocks=1, variables=FEW)))
    assert val["source"] == "val" and val["loss"] == pytest.approx(1.5, abs=1e-6) and not val["diverged"]
    no_val = write_run(tmp_path / "t", SynthRun(final_loss=1.5, val_every=None, train_steps=40, blocks=1,
                                                variables=FEW))
    res = transfer.final_loss(no_val)
    metrics = load.load_metrics(no_val)
    assert res["source"] == "train" and res["loss"] == pytest.approx(metrics["loss"].iloc[-4:].mean())  # 10% of 40
    bad = transfer.final_loss(write_run(tmp_path / "d", SynthRun(final_loss=math.nan, blocks=1, variables=FEW)))
    assert bad["diverged"] and bad["loss"] == math.inf and bad["state"] == "failed"


def test_nan_stop_is_divergence_a_crash_is_missing_and_running_is_not_usable(tmp_path):
    run = write_run(tmp_path / "f", SynthRun(blocks=1, variables=FEW))
    # The trainer's NaN stop: status failed with the bad step (metrics here stay finite).
    (run / schema.STATUS_NAME).write_text(json.dumps({"state": "failed", "step": 3, "bad_step": 3}))
    res = transfer.final_loss(run)
    assert res["loss"] == math.inf and res["diverged"] and not res["missing"]
    # Killed / out of memory: failed without a bad step says nothing about the LR's stability.
    (run / schema.STATUS_NAME).write_text(json.dumps({"state": "failed", "step": 3, "message": "KeyboardInterrupt"}))
    res = transfer.final_loss(run)
    assert math.isnan(res["loss"]) and res["missing"] and not res["diverged"]
    losses = transfer.final_losses(run)
    assert losses["missing"].item() and not losses["usable"].item()
    (run / schema.STATUS_NAME).write_text(json.dumps({"state": "running", "step": 3}))
    losses = transfer.final_losses(run)
    assert losses["state"].item() == "running" and not losses["usable"].item() and not losses["missing"].item()


def _grid(depth=2, seeds=(0, 1, 2), xs=(-11.0, -10.0, -9.0, -8.0, -7.0, -6.0), opt=-8.3, curvature=0.05,
          seed_offset=None, noise=0.0, rng_seed=0) -> pd.DataFrame:
    """A final_losses-like frame: loss = 2 + curvature·(x − opt)² + seed_offset[seed] + noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for s in seeds:
        offset = 0.0 if seed_offset is None else seed_offset[s]
        for x in xs:
            loss = 2 + curvature * (x - opt) ** 2 + offset + noise * rng.standard_normal()
            rows.append({"param": "alpha=1", "alpha": 1.0, "depth": depth, "width": 64, "seed": s, "lr": 2.0**x,
                         "log2_lr": x, "loss": loss, "diverged": False, "missing": False, "usable": True})
    return pd.DataFrame(rows)


def test_bootstrap_resamples_seeds_jointly_across_lrs():
    # Each seed adds the same offset at every LR (shared init and data order): the offset cannot move
    # the optimum, so the joint bootstrap's interval has zero width. Resampling each LR's seeds on its
    # own (the old behaviour) mixes offsets across LRs and spreads the optimum over the whole grid.
    offsets = {0: -0.4, 1: 0.0, 2: 0.5}
    res = transfer.lr_transfer(_grid(seed_offset=offsets), n_boot=300)
    r = res.optima.iloc[0]
    assert r["log2_lr_opt"] == pytest.approx(-8.3, abs=1e-9)
    assert r["ci_high"] - r["ci_low"] < 1e-9
    # With small independent noise on top, the interval still covers the truth and stays narrow.
    res = transfer.lr_transfer(_grid(seed_offset=offsets, noise=0.002, rng_seed=1), n_boot=300)
    r = res.optima.iloc[0]
    assert r["ci_low"] <= -8.3 <= r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.3


def test_joint_seed_bootstrap_matches_resampling_rows_by_hand():
    table = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0], [7.0, 8.0, 9.0]])
    got = transfer.joint_seed_bootstrap(table, 50, np.random.default_rng(5))
    idx = np.random.default_rng(5).integers(0, 3, size=(50, 3))  # the same draws
    for b in range(50):
        rows = table[idx[b]]
        for j in range(3):
            present = rows[np.isfinite(rows[:, j]), j]
            want = present.mean() if present.size else np.nanmean(table[:, j])
            assert got[b, j] == pytest.approx(want, rel=1e-12)


def test_crashed_runs_do_not_push_the_optimum_down():
    # Seed 1 crashed (killed) at the two largest LRs: missing, not diverged. Counted as divergence they
    # would make those LRs unusable and pull the optimum to the left; left out, it stays at −8.3.
    grid = _grid(opt=-7.6)
    crash = (grid["seed"] == 1) & (grid["log2_lr"] >= -7)
    grid.loc[crash, ["loss", "missing", "usable"]] = [math.nan, True, False]
    r = transfer.lr_transfer(grid, n_boot=100).optima.iloc[0]
    assert r["n_missing"] == 2 and r["n_diverged"] == 0 and r["n_lrs"] == 6
    assert r["log2_lr_opt"] == pytest.approx(-7.6, abs=1e-9) and r["min_seeds"] == 2 and r["n_seeds"] == 3
    as_diverged = _grid(opt=-7.6)
    as_diverged.loc[crash, ["loss", "diverged"]] = [math.inf, True]
    r_old = transfer.lr_transfer(as_diverged, n_boot=100).optima.iloc[0]
    assert r_old["n_lrs"] == 4 and r_old["log2_lr_opt"] < -7.6 - 0.3


def test_edge_optima_are_flagged_and_left_out_of_the_drift_fit():
    # Depths 2, 4, 8 have interior optima on a slope of −1; at depth 32 the optimum (−12.3) lies below
    # the grid, so its fit is clipped to −11 and would flatten the drift if it entered the fit.
    frames = [_grid(depth=d, opt=-8.3 - math.log2(d / 2), noise=0.001, rng_seed=d) for d in (2, 4, 8, 32)]
    res = transfer.lr_transfer(pd.concat(frames, ignore_index=True), n_boot=200)
    optima = res.optima.set_index("depth")
    assert optima["at_edge"].tolist() == [False, False, False, True]
    drift = res.drift.iloc[0]
    assert drift["depths"] == [2, 4, 8] and drift["edge_depths"] == [32] and drift["n_depths"] == 3
    assert drift["slope"] == pytest.approx(-1.0, abs=0.03)
    with_edge = np.polyfit(np.log2([2, 4, 8, 32]), optima["log2_lr_opt"], 1)[0]
    assert with_edge > -0.8  # what the fit would have said with the clipped optimum in it


@pytest.fixture(scope="module")
def transfer_result(transfer_losses):
    return transfer.lr_transfer(transfer_losses, n_boot=400)


def test_final_losses_from_paths_equal_from_dataset(transfer_sweep, transfer_losses):
    from_paths = transfer.final_losses(transfer_sweep)
    pd.testing.assert_frame_equal(from_paths, transfer_losses)
    assert len(from_paths) == 2 * 3 * 6 * 2


def test_optimum_recovers_planted_optimum_per_depth(transfer_result):
    optima = transfer_result.optima
    assert len(optima) == len(TRANSFER_DRIFT) * len(TRANSFER_DEPTHS)
    for _, r in optima.iterrows():
        planted = planted_log2_lr_opt(r["param"], r["depth"])
        assert r["log2_lr_opt"] == pytest.approx(planted, abs=0.05)
        assert r["lr_opt"] == pytest.approx(2 ** r["log2_lr_opt"])
        assert r["ci_low"] - 0.03 <= planted <= r["ci_high"] + 0.03
        assert r["method"] == "quadratic" and not r["at_edge"]
        # Planted: loss = 2 - 0.05 log2(depth) + curvature * (x - x*)^2, so the best grid loss is near 2 - ...
        assert r["best_loss"] == pytest.approx(2.0 - 0.05 * math.log2(r["depth"]), abs=0.02)


def test_diverged_runs_are_reported_and_excluded(transfer_result):
    optima = transfer_result.optima.set_index(["param", "depth"])
    for label in TRANSFER_DRIFT:
        for depth in TRANSFER_DEPTHS:
            bad = [x for x in TRANSFER_LOG2_LRS if x - planted_log2_lr_opt(label, depth) > 2.5]
            assert optima.loc[(label, depth), "n_diverged"] == 2 * len(bad)
            assert optima.loc[(label, depth), "n_lrs"] == len(TRANSFER_LOG2_LRS) - len(bad)
    losses = transfer_result.losses
    assert np.isinf(losses.loc[losses["diverged"], "loss"]).all()


def test_drift_recovers_planted_slope(transfer_result):
    drift = transfer_result.drift.set_index("param")
    for label, planted in TRANSFER_DRIFT.items():
        assert drift.loc[label, "slope"] == pytest.approx(planted, abs=0.03)
        assert drift.loc[label, "ci_low"] - 0.03 <= planted <= drift.loc[label, "ci_high"] + 0.03
        assert drift.loc[label, "depths"] == list(TRANSFER_DEPTHS)
    # Independent check of the drift's point estimate.
    mup = transfer_result.optima[transfer_result.optima.param == "mup"]
    assert drift.loc["mup", "slope"] == pytest.approx(
        np.polyfit(np.log2(mup["depth"]), mup["log2_lr_opt"], 1)[0], rel=1e-9)


def test_optimum_from_means_matches_polyfit_on_the_window():
    x = np.arange(-11.0, -5.0)
    rng = np.random.default_rng(3)
    means = 2 + 0.05 * (x + 8.3) ** 2 + 0.003 * rng.standard_normal(x.size)
    for n in (3, 4, 5):
        got, method = transfer.optimum_from_means(x, means, n_points=n)
        i = int(np.argmin(means))
        window = np.argsort(np.abs(x - x[i]), kind="stable")[:n]
        a, b, _ = np.polyfit(x[window], means[window], 2)
        assert method == "quadratic" and got[0] == pytest.approx(-b / (2 * a), rel=1e-9)


def test_optimum_falls_back_to_grid_and_clips_at_edges():
    x = np.array([-10.0, -9.0, -8.0, -7.0])
    concave = 5 - (x + 8.4) ** 2  # a maximum, no minimum: keep the grid's lowest point
    got, method = transfer.optimum_from_means(x, concave)
    assert method == "grid" and got[0] == -10.0
    falling = np.array([3.0, 2.5, 2.2, 2.1])  # minimum beyond the grid's largest LR
    got, _ = transfer.optimum_from_means(x, falling)
    assert got[0] <= x.max()
    got, method = transfer.optimum_from_means(x[:2], falling[:2])
    assert method == "grid" and got[0] == -9.0


def test_at_edge_flag_and_one_lr_is_insufficient(tmp_path):
    rows = [{"param": "alpha=1", "alpha": 1.0, "depth": 2, "width": 64, "seed": s, "lr": 2.0**x, "log2_lr": x,
             "loss": 3.0 - 0.1 * x + 0.001 * s, "diverged": False, "usable": True}
            for x in (-10, -9, -8) for s in (0, 1)]
    res = transfer.lr_transfer(pd.DataFrame(rows), n_boot=50)
    assert res.optima["at_edge"].item()
    with pytest.raises(InsufficientSweepError, match="two or more learning rates"):
        transfer.lr_transfer(pd.DataFrame(rows[:2]))


class _Sabotage(Observer):
    """Observer for a real run: at `step`, either poison a weight with NaN (the next loss is NaN: the
    trainer's NaN stop) or raise like a kill / out-of-memory would."""

    name = "sabotage"

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def wants(self, step):
        return step == self.step

    def before_update(self, step, trainer):
        if self.how == "crash":
            raise RuntimeError("CUDA out of memory (simulated by the test)")

    def after_update(self, step, trainer):
        if self.how == "nan":
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("how", ["nan", "crash"])
def test_real_trainer_nan_stop_is_diverged_and_a_crash_is_missing(tmp_path, how):
    """The status.json the real trainer writes: a NaN stop carries bad_step (diverged); a crash does not
    (missing), so it is left out of the optimum instead of marking its LR unstable."""
    from tests.probes.conftest import tiny_spec
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    spec = tiny_spec(steps=6)
    with pytest.raises(Exception):  # noqa: B017 - NonFiniteLoss or the simulated crash, re-raised by run()
        Trainer(spec, tmp_path, observers=[_Sabotage(2, how)], quiet=True).run()
    res = transfer.final_loss(tmp_path)
    assert res["state"] == "failed"
    if how == "nan":
        assert res["diverged"] and not res["missing"] and res["loss"] == math.inf
    else:
        assert res["missing"] and not res["diverged"] and math.isnan(res["loss"])

"""The spike detector's rule on known series, and a spike made on purpose: detected, replayed bitwise, explained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from trainer.spikes import SpikeDetector, SpikeRule

REPO = Path(__file__).resolve().parents[2]


def test_detector_flags_an_upward_jump_once_it_has_history():
    rng = np.random.default_rng(0)
    det = SpikeDetector(SpikeRule(window=20, min_history=10, threshold=6.0))
    losses = list(3.0 * np.exp(0.01 * rng.standard_normal(30)))  # 1% noise around 3
    losses[5] = 30.0  # too early: fewer than min_history steps seen
    losses[25] = 6.0  # a doubling
    marked = [step for step, loss in enumerate(losses) if det.observe({"loss": loss, "grad_norm": 1.0})]
    assert marked == [25]


def test_detector_scale_is_robust_to_the_spikes_in_its_window():
    det = SpikeDetector(SpikeRule(window=20, min_history=5, threshold=6.0))
    for i in range(20):
        det.observe({"loss": 100.0 if i % 10 == 0 else 2.0})  # two earlier spikes in the window
    # The median/MAD ignore them: the z of a new doubling is log(2) / max(1.4826 · MAD, 1%) = 69.
    assert det.zscore("loss", 4.0) == (math.log(4.0) - math.log(2.0)) / 0.01
    assert not det.observe({"loss": 2.05})  # a 2.5% wiggle is no spike
    assert math.isnan(SpikeDetector().zscore("loss", 1.0))


def _diagnose(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


INJECTED = 20


def test_an_injected_lr_spike_is_detected_replayed_bitwise_and_explained(tmp_path):
    run = tmp_path / "run"
    proc = _diagnose("run", "--width", "32", "--head-size", "16", "--depth", "3", "--steps", "26", "--batch-size", "4",
                     "--seq-len", "32", "--lr", "0.01", "--probe-every", "10", "--probe-batch", "4",
                     "--checkpoint-every", "4", "--keep-checkpoints-every", "4", "--log-every", "5",
                     "--eval-every", "100", "--probe-health-every", "10", "--debug-lr-spike", f"{INJECTED}:100",
                     "--grad-clip", "1",  # the scenario this test was built on (the CLI default is now 0)
                     "--out", str(run), "--quiet",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    marked = [m["step"] for m in metrics if m.get("spike")]
    assert marked and marked[0] == INJECTED + 1  # the loss after the injected update
    assert [m["step"] for m in metrics if "loss" in m and m["step"] <= INJECTED and m.get("spike")] == []

    proc = _diagnose("replay", str(run), "--step", str(marked[0]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    replay = run / f"replay_{marked[0]}"
    report = json.loads((replay / "spike_report.json").read_text())
    assert report["replay"]["bitwise"] is True and report["replay"]["start"] == 12
    assert report["onset_step"] == INJECTED
    assert set(report["first_signals"]) <= {"update_rel", "update_spectral_rel"}
    assert sorted(report["first_layers"]) == [0, 1, 2]  # an LR spike moves every layer's update at once
    assert f"Earliest excursion: step {INJECTED}" in (replay / "spike_report.md").read_text()
    assert (replay / "spike_report.png").stat().st_size > 10_000
    # Dense probes at every replayed step; where the original run also probed, the records are identical.
    dense = xr.open_zarr(replay / "probes.zarr").load()
    assert [int(s) for s in dense.step] == list(range(12, marked[0] + 4))
    sparse = xr.open_zarr(run / "probes.zarr").load()
    common = sorted(set(dense.step.values) & set(sparse.step.values))
    assert common == [20]
    for name in ("act_rms", "attn_max_logit", "adam_eps_dominance", "lin_ratio", "internal_kurtosis"):
        np.testing.assert_array_equal(dense[name].sel(step=common).values, sparse[name].sel(step=common).values,
                                      err_msg=name)
    # The power iteration is warm-started from the previous probe step, which differs between a dense
    # and a sparse schedule: the same estimate, not the same bits.
    np.testing.assert_allclose(dense["weight_spectral_norm"].sel(step=common).values,
                               sparse["weight_spectral_norm"].sel(step=common).values, rtol=0.03)


def test_bad_replay_and_spike_options_are_one_line(tmp_path):
    proc = _diagnose("replay", str(tmp_path), "--step", "3", cwd=tmp_path)
    assert proc.returncode != 0 and "is not a run dir (no config.json)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _diagnose("run", "--debug-lr-spike", "twenty", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode != 0 and "must be STEP:FACTOR" in proc.stderr and "Traceback" not in proc.stderr
    proc = _diagnose("run", "--keep-checkpoints-every", "30", "--checkpoint-every", "20", "--out",
                     str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode != 0 and "multiple of checkpoint_every=20" in proc.stderr
    assert not (tmp_path / "r").exists()

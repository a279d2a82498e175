"""A run killed with SIGKILL leaves a readable store; --resume completes it with no duplicate or gap."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from probes.recorder import probe_steps

STEPS = 60
ARGS = ["run", "--alpha", "1", "--width", "64", "--depth", "2", "--seq-len", "32", "--batch-size", "4",
        "--steps", str(STEPS), "--probe-every", "1", "--probe-flush", "1", "--probe-batch", "2",
        "--checkpoint-every", "5", "--eval-every", "10", "--log-every", "1", "--no-report", "--quiet"]


def _diagnose(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _stored_steps(store) -> list[int]:
    with xr.open_zarr(store, consolidated=False) as ds:
        return [int(s) for s in ds.step.values]


def _logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.is_file() else 0


def test_sigkill_then_resume_gives_complete_duplicate_free_store(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diagnose", *ARGS, "--out", "killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = tmp_path / "killed" / "probes.zarr"
    deadline = time.time() + 240
    # Metrics are flushed every step and probes every probe step: kill a third of the way in.
    while _logged_steps(tmp_path / "killed") < STEPS // 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"run ended before it could be killed: {proc.stderr.read()}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = _stored_steps(store)  # readable after the kill, and holds every flushed step
    assert len(seen) >= 5 and seen == sorted(set(seen))

    resumed = _diagnose(*ARGS, "--out", "killed", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    reference = _diagnose(*ARGS, "--out", "straight", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    a = xr.open_zarr(tmp_path / "killed" / "probes.zarr").load()
    b = xr.open_zarr(tmp_path / "straight" / "probes.zarr").load()
    assert [int(s) for s in a.step.values] == probe_steps(STEPS, 1)
    # Resume is bitwise exact on CPU, so the resumed records equal the uninterrupted run's.
    for name in ("train_loss", "act_rms", "delta0_rms", "delta_prev_rms", "lin_ratio", "update_rel"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    losses = [line for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == STEPS


def test_resume_keeps_the_probe_config_the_run_started_with(tmp_path):
    """Resume reads the stored probe config; one written before lin_batch_size existed means all sequences."""
    import json

    from diagnose.cli import _stored_spec

    short = [a if a != str(STEPS) else "4" for a in ARGS]
    proc = _diagnose(*short, "--probe-lin-batch", "2", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config_path = tmp_path / "run" / "config.json"
    assert _stored_spec(tmp_path / "run")[1].lin_batch_size == 2
    config = json.loads(config_path.read_text())
    del config["probes"]["lin_batch_size"]
    config_path.write_text(json.dumps(config))
    assert _stored_spec(tmp_path / "run")[1].lin_batch_size == 0

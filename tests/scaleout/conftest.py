"""Helpers for the scale-out tests: real torchrun launches on gloo, 2 processes, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Tiny, but with everything DDP touches: 2 micro-batches per rank (no_sync), validation, checkpoints,
# probes (early schedule + every 4), a final checkpoint. Global batch 8 = 2 ranks × 2 micro × 2.
RUN_ARGS = ["--width", "64", "--depth", "2", "--seq-len", "16", "--batch-size", "8", "--grad-accum", "2",
            "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--log-every", "2",
            "--probe-every", "4", "--probe-batch", "2", "--device", "cpu", "--no-report"]

# 1 vs 2 processes: DDP averages per-rank gradients (each a mean over half the batch) where one
# process takes one mean over the whole batch, so the float32 sums round differently (~1e-7
# relative); Adam carries that forward. Over these 8 steps the losses agree to a few float32 ulps
# (measured ≤ 4.8e-7 absolute at loss ≈ 4); the tolerance allows ~20 ulps.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""),
             PYTHONWARNINGS="ignore")
    return e


def torchrun(args: list[str], cwd: Path, nproc: int = 2, module: bool = True, timeout: int = 120):
    """`torchrun --standalone --nproc-per-node N [-m] diagnose ...` (a free port, gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += (["-m", "diagnose"] if module else []) + args
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def single(args: list[str], cwd: Path, timeout: int = 120):
    """The same command as one plain process: `python -m diagnose ...`."""
    return subprocess.run([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: train line}, {step: val_loss}) from metrics.jsonl."""
    train, val = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            val[row["step"]] = row["val_loss"]
        else:
            train[row["step"]] = row
    return train, val


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"

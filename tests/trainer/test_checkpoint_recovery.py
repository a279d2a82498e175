"""Damaged checkpoints: one clear line and a way on, through the real CLI in a subprocess.

A finished run dir keeps `checkpoint.pt` (the last step) and `checkpoint.prev.pt` (the checkpoint
before it). `--resume` with an unreadable latest file says what is wrong with it, resumes from the
previous one and re-runs the steps after it exactly (metrics and probe store as an uninterrupted
run's); with both unreadable it exits non-zero with one line naming both, and changes nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from trainer import checkpoint as ckpt

STEPS = 6
ARGS = ["run", "--alpha", "1", "--width", "64", "--depth", "2", "--seq-len", "32", "--batch-size", "4",
        "--steps", str(STEPS), "--checkpoint-every", "2", "--eval-every", "2", "--log-every", "1",
        "--probe-every", "1", "--probe-flush", "1", "--probe-batch", "2", "--no-report", "--quiet"]


def _diagnose(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # throughput differs


def _probes(run) -> xr.Dataset:
    return xr.open_zarr(run / "probes.zarr").load()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run dir (read only: tests work on copies)."""
    root = tmp_path_factory.mktemp("finished")
    proc = _diagnose(*ARGS, "--out", "run", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_finished_run_keeps_the_previous_checkpoint(finished):
    latest = ckpt.load(finished / ckpt.CHECKPOINT_NAME)
    previous = ckpt.load(finished / ckpt.PREVIOUS_NAME)
    assert latest["step"] == STEPS and previous["step"] == STEPS - 2  # checkpoints at 2, 4 and the end
    assert not list(finished.glob(".checkpoint*"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_resume_falls_back_to_the_previous_checkpoint(finished, tmp_path, damage):
    run = _copy(finished, tmp_path)
    latest = run / ckpt.CHECKPOINT_NAME
    data = latest.read_bytes()
    if damage == "truncated":  # a copy cut short
        latest.write_bytes(data[: len(data) // 2])
    else:  # overwritten with the same number of random bytes
        latest.write_bytes(np.random.default_rng(0).bytes(len(data)))
    damaged = latest.read_bytes()
    proc = _diagnose(*ARGS, "--out", "run", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, proc.stderr
    assert str(latest.relative_to(tmp_path)) in warning[0] and ckpt.PREVIOUS_NAME in warning[0]
    assert ("truncated or corrupted" if damage == "truncated" else "not a torch checkpoint") in warning[0]
    assert f"(step {STEPS - 2})" in warning[0]
    # The run went back to step 4 and ran 4 and 5 again: the same records as the uninterrupted run.
    assert _metrics(run) == _metrics(finished)
    a, b = _probes(run), _probes(finished)
    assert a.step.values.tolist() == b.step.values.tolist() == list(range(STEPS))
    for name in ("train_loss", "lin_ratio", "delta0_rms", "delta_prev_rms", "update_rel"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)  # bitwise on CPU
    assert ckpt.load(latest)["step"] == STEPS  # readable again
    # The damaged file is kept aside, not rotated in as the "previous" checkpoint.
    assert ckpt.load(run / ckpt.PREVIOUS_NAME)["step"] == STEPS - 2
    assert (run / ckpt.DAMAGED_NAME).read_bytes() == damaged
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_both_checkpoints_damaged_is_one_line_and_changes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path)
    latest, previous = run / ckpt.CHECKPOINT_NAME, run / ckpt.PREVIOUS_NAME
    latest.write_bytes(latest.read_bytes()[:1000])
    previous.write_bytes(np.random.default_rng(1).bytes(previous.stat().st_size))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _diagnose(*ARGS, "--out", "run", "--resume", cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot resume" in lines[0]
    assert f"{latest.relative_to(tmp_path)} is truncated or corrupted" in lines[0]
    assert f"{previous.relative_to(tmp_path)} is not a torch checkpoint" in lines[0]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # metrics, probe store, status and both files untouched


# --- the checkpoint module on its own (no subprocess) ----------------------------------------------------


class NotATensor:
    """A pickled class instance: what a weights-only load must refuse."""


def test_read_names_the_defect(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.save_atomic({"step": 3, "model": {"w": torch.ones(4)}}, good)
    assert ckpt.read(good, required=("step", "model"))["step"] == 3
    cases = {
        "empty.pt": (b"", "is empty"),
        "cut.pt": (good.read_bytes()[:-200], "is truncated or corrupted"),
        "noise.pt": (np.random.default_rng(2).bytes(4096), "is not a torch checkpoint"),
        "pickle.pt": (pickle.dumps({"x": 1}), "is not a torch checkpoint"),
    }
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ckpt.CheckpointError, match=needle) as err:
            ckpt.read(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    torch.save({"obj": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(ckpt.CheckpointError, match="weights-only load refuses"):
        ckpt.read(tmp_path / "code.pt")
    with pytest.raises(ckpt.CheckpointError, match="lacks optimizer"):
        ckpt.read(good, required=("step", "optimizer"))


def test_save_keeping_previous_rotates_and_load_latest_falls_back(tmp_path):
    path = tmp_path / ckpt.CHECKPOINT_NAME
    for step in (1, 2, 3):
        ckpt.save_keeping_previous({"step": step}, path)
    assert ckpt.load(path)["step"] == 3 and ckpt.load(tmp_path / ckpt.PREVIOUS_NAME)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.PREVIOUS_NAME, ckpt.CHECKPOINT_NAME]
    state, used, problems = ckpt.load_latest(tmp_path, required=("step",))
    assert (state["step"], used, problems) == (3, path, [])
    path.write_bytes(b"\0" * 10)
    state, used, problems = ckpt.load_latest(tmp_path, required=("step",))
    assert state["step"] == 2 and used.name == ckpt.PREVIOUS_NAME and "is not a torch checkpoint" in problems[0]
    ckpt.promote_previous(tmp_path)  # what the trainer does after falling back
    assert ckpt.load(path)["step"] == 2 and (tmp_path / ckpt.DAMAGED_NAME).read_bytes() == b"\0" * 10
    ckpt.save_keeping_previous({"step": 3}, path)
    assert ckpt.load(tmp_path / ckpt.PREVIOUS_NAME)["step"] == 2  # not the damaged file
    path.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.read(path)
    state, used, problems = ckpt.load_latest(tmp_path)
    assert used.name == ckpt.PREVIOUS_NAME and "is missing" in problems[0]
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.load_latest(tmp_path / "empty")


def test_a_readable_checkpoint_of_another_model_is_one_line(tmp_path):
    from tests.probes.conftest import tiny_spec
    from trainer.loop import Trainer

    Trainer(tiny_spec(steps=2, depth=2), tmp_path, quiet=True).run()
    files = {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*")}
    with pytest.raises(ckpt.CheckpointError, match="does not fit this run's model") as err:
        Trainer(tiny_spec(steps=2, depth=3), tmp_path, quiet=True).run(resume=True)
    assert "\n" not in str(err.value) and ckpt.CHECKPOINT_NAME in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("checkpoint*")} == files  # nothing promoted or moved

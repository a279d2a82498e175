"""`torchrun --nproc-per-node 2 -m diagnose run` on gloo: same trajectory and probe records as one
process, rank 0 alone writes and prints, resume after a hard kill, clear errors on bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from diagnose.cli import main
from tests.scaleout.conftest import LOSS_RTOL, REPO, RUN_ARGS, assert_ok, metrics, torchrun

# Probe records: per-layer statistics of activations, updates and the linearization, all computed
# from the (all-reduced) gradients and parameters. They agree to ~1e-7 relative, except the update
# size of the hidden biases: the attention *key* bias has an analytically zero gradient (softmax
# ignores a per-query constant) whose float noise (~1e-10) Adam with ε ≈ 4e-12 normalises to a
# full-size update, so its value is rounding noise and differs with the reduction order (~1%).
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-7
NOISY_BIAS_RTOL = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-process run and the same run on 2 gloo processes (default --out: rank 0 names it)."""
    root = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    one = CliRunner().invoke(main, ["run", *RUN_ARGS, "--quiet", "--out", str(root / "one")])
    assert one.exit_code == 0, one.output
    two = torchrun(["run", *RUN_ARGS], cwd=root)
    assert_ok(two)
    made = sorted((root / "runs").iterdir())
    assert len(made) == 1, f"the ranks disagreed on the run dir: {made}"
    return root / "one", made[0], two


def test_two_processes_match_one_process_loss_trajectory(runs):
    one, two, _ = runs
    (t1, v1), (t2, v2) = metrics(one), metrics(two)
    assert sorted(t1) == sorted(t2) == list(range(8)) and sorted(v1) == sorted(v2) == [0, 4, 8]
    diffs = [abs(t1[s]["loss"] - t2[s]["loss"]) for s in t1]
    assert max(diffs) <= LOSS_RTOL * max(abs(t1[s]["loss"]) for s in t1), diffs
    for s in t1:
        assert math.isclose(t1[s]["grad_norm"], t2[s]["grad_norm"], rel_tol=1e-4)
        assert t1[s]["lr"] == t2[s]["lr"]
    for s in v1:
        assert math.isclose(v1[s], v2[s], rel_tol=LOSS_RTOL)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((two / "status.json").read_text())["state"] == "finished"


def test_two_process_probe_dataset_equals_one_process(runs):
    one, two, _ = runs
    with xr.open_zarr(one / "probes.zarr") as a, xr.open_zarr(two / "probes.zarr") as b:
        a, b = a.load(), b.load()
    assert a.attrs == b.attrs  # same config, probe config, versions: the same Dataset
    assert set(a.data_vars) == set(b.data_vars) and a["step"].values.tolist() == b["step"].values.tolist()
    for name in a.data_vars:
        x, y = a[name], b[name]
        assert x.dims == y.dims and x.shape == y.shape, name
        if "block_role" in x.dims and name.startswith("update_"):
            noisy = dict(block_role="hidden_bias")
            np.testing.assert_allclose(x.sel(noisy), y.sel(noisy), rtol=NOISY_BIAS_RTOL, err_msg=name)
            x, y = x.drop_sel(noisy), y.drop_sel(noisy)
        if name == "adam_eps_dominance":  # whether ε ≥ √v̂ for the key bias's rounding noise is itself noise:
            noisy = dict(block_role="hidden_bias")  # the key bias is 1/9 of a block's bias coordinates
            np.testing.assert_allclose(x.sel(noisy), y.sel(noisy), atol=1 / 9, err_msg=name)
            x, y = x.drop_sel(noisy), y.drop_sel(noisy)
        np.testing.assert_allclose(x.values, y.values, rtol=PROBE_RTOL, atol=PROBE_ATOL, err_msg=name)


def test_only_rank_zero_prints(runs):
    _, two, proc = runs
    assert proc.stdout.count("run dir:") == 1
    logs = proc.stdout + proc.stderr
    assert logs.count("step      0  val_loss") == 1  # one progress log, not one per rank
    assert logs.count("non-embedding params") == 1


def test_resume_under_ddp_after_a_hard_kill(runs, tmp_path):
    _, reference, _ = runs
    out = tmp_path / "killed"
    killed = torchrun([str(REPO / "tests/scaleout/_stop_after_checkpoint.py"), "run", *RUN_ARGS, "--quiet",
                       "--out", str(out)], cwd=tmp_path, module=False)
    assert killed.returncode != 0
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert sorted(metrics(out)[0]) == [0, 1, 2, 3]

    resumed = torchrun(["run", "--resume", "--quiet", "--no-report", "--out", str(out)], cwd=tmp_path)
    assert_ok(resumed)
    assert resumed.stdout.count("run dir:") == 1
    (tr, vr), (tref, vref) = metrics(out), metrics(reference)
    assert sorted(tr) == sorted(tref) and sorted(vr) == sorted(vref)
    # Same world size, same reduction order: the resumed run continues the uninterrupted one bit for bit.
    for s in tref:
        assert tr[s]["loss"] == tref[s]["loss"]
        assert tr[s]["grad_norm"] == tref[s]["grad_norm"]
    assert vr == vref
    with xr.open_zarr(out / "probes.zarr") as a, xr.open_zarr(reference / "probes.zarr") as b:
        a, b = a.load(), b.load()
    assert a["step"].values.tolist() == b["step"].values.tolist()
    for name in a.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=1e-9, err_msg=name)
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


@pytest.mark.parametrize("rank", [0, 1])
def test_world_size_that_does_not_divide_the_batch_fails_clearly(tmp_path, monkeypatch, rank):
    # As torchrun starts each rank: the check runs before any rendezvous, so no launcher is needed.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    args = [a if a != "8" else "6" for a in RUN_ARGS]  # --batch-size 6: 6 % (grad_accum 2 × world 2) != 0
    result = CliRunner().invoke(main, ["run", *args, "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1
    if rank == 0:
        assert result.output.strip() == ("Error: batch_size=6 is not divisible by grad_accum × world size = 2 × 2: "
                                         "each of the 2 processes takes an equal share of every micro-batch")
    else:
        assert result.output == ""  # one message per launch, from rank 0
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_nccl_without_cuda_fails_clearly(tmp_path):
    result = CliRunner().invoke(main, ["run", *RUN_ARGS, "--dist-backend", "nccl", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "--dist-backend nccl needs CUDA" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_run_dir_check_happens_before_training(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["run", *RUN_ARGS, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_rank_shards_partition_the_global_batch():
    from trainer.data import DataConfig, TokenData

    data = TokenData(DataConfig(), 16)
    full = data.train_batch(3, 7, 8)
    for world in (1, 2, 4):
        shards = [data.train_batch(3, 7, 8, rank, world) for rank in range(world)]
        assert all(s.shape == (8 // world, 17) for s in shards)
        assert torch.equal(torch.cat(shards), full)

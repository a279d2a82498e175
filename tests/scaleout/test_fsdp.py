"""FSDP2 on gloo, 2 processes, against one plain process: `diagnose run --dist fsdp` and a user's own
FSDP2 loop wrapped in `ProbeLog` (one torchrun launch for both), then resume after a hard kill (slow).

Every comparison is with an *unsharded* 1-process run of the same global batch: the losses, the grad
norm and every probe variable (linearization ratios included) must agree to float rounding, which a
statistic reduced over ranks zero times or twice (a factor √2 or 2 on 2 ranks) cannot.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from diagnose.cli import main
from tests.scaleout._fsdp_launch import LOOP_PROBES, LOOP_STEPS, user_loop
from tests.scaleout.conftest import REPO, assert_ok, metrics, torchrun

# 20 steps, 2 micro-batches per rank, validation and checkpoints every 10, probes on the early schedule
# and every 4. `--eps 1e-8`: at the default ε (1e-12 × 4 here) Adam turns the attention key bias's
# analytically zero, ~1e-10 rounding-noise gradient into a full-size update, so `update_*` of the hidden
# biases differ by ~1% between any two reduction orders (DDP too: tests/scaleout/test_ddp.py). With
# ε = 1e-8 that noise stays below every other update, and all variables must agree to 1e-5.
ARGS = ["--width", "64", "--depth", "2", "--seq-len", "16", "--batch-size", "8", "--grad-accum", "2",
        "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10", "--log-every", "5",
        "--probe-every", "4", "--probe-batch", "2", "--eps", "1e-8", "--grad-clip", "1", "--device", "cpu",
        "--no-report", "--quiet"]
# Measured on 2 gloo processes vs 1 process (CPU, float32 training, float64 linearization): losses and
# grad norms ≤ 3.5e-7 relative over 20 steps; probe variables ≤ 2.8e-6 (update sizes), ≤ 9e-7 (the rest).
RTOL = 1e-5
KEY_BIAS_SENSITIVE = {"attn_max_logit"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process run, FSDP2 run, 1-process user loop, FSDP2 user loop, launch) in one tmp dir."""
    root = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    one = CliRunner().invoke(main, ["run", *ARGS, "--out", str(root / "one")])
    assert one.exit_code == 0, one.output
    (root / "loop_one").mkdir()
    user_loop(root / "loop_one", shard=False)
    (root / "loop_fsdp").mkdir()
    launch = torchrun([str(REPO / "tests/scaleout/_fsdp_launch.py"), str(root / "loop_fsdp"), "run", *ARGS,
                       "--dist", "fsdp", "--out", str(root / "fsdp")], cwd=root, module=False, timeout=300)
    assert_ok(launch)
    return root / "one", root / "fsdp", root / "loop_one", root / "loop_fsdp", launch


def _assert_same_records(a_dir, b_dir, ignore_attrs=()):
    with xr.open_zarr(a_dir / "probes.zarr") as a, xr.open_zarr(b_dir / "probes.zarr") as b:
        a, b = a.load(), b.load()
    assert {k: v for k, v in a.attrs.items() if k not in ignore_attrs} == \
        {k: v for k, v in b.attrs.items() if k not in ignore_attrs}
    assert set(a.data_vars) == set(b.data_vars)
    assert a["step"].values.tolist() == b["step"].values.tolist()  # each step once: one writer
    for name in a.data_vars:
        assert a[name].dims == b[name].dims, name
        # The max attention logit contains q·b_k, and the key bias b_k has an analytically zero gradient,
        # so its Adam updates are rounding noise that differs between reduction orders (see ARGS); the
        # softmax (and so the entropy) is blind to it. Measured: 3.4e-5 relative in the plain FSDP2 loop.
        rtol = 1e-4 if name in KEY_BIAS_SENSITIVE else RTOL
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=rtol, atol=0, err_msg=name)
    return a


def test_fsdp_losses_and_grad_norms_match_one_process_over_20_steps(runs):
    one, fsdp, *_ = runs
    (t1, v1), (t2, v2) = metrics(one), metrics(fsdp)
    assert sorted(t1) == sorted(t2) == list(range(20)) and sorted(v1) == sorted(v2) == [0, 10, 20]
    for s in t1:
        assert math.isclose(t2[s]["loss"], t1[s]["loss"], rel_tol=RTOL), (s, t1[s], t2[s])
        # The clipped norm is the whole model's (shards combined across ranks), not a shard's (÷√2).
        assert math.isclose(t2[s]["grad_norm"], t1[s]["grad_norm"], rel_tol=RTOL), (s, t1[s], t2[s])
        assert t2[s]["lr"] == t1[s]["lr"]
    assert any(t1[s]["grad_norm"] > 1.0 for s in t1)  # --grad-clip 1 is active on some steps
    for s in v1:
        assert math.isclose(v2[s], v1[s], rel_tol=RTOL)
    config = json.loads((fsdp / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["dist"] == "fsdp"
    assert json.loads((fsdp / "status.json").read_text())["state"] == "finished"


def test_fsdp_probe_records_equal_one_process(runs):
    one, fsdp, *_ = runs
    ds = _assert_same_records(one, fsdp, ignore_attrs=("config",))
    assert ds["step"].values.tolist() == [0, 1, 2, 4, 8, 12, 16, 19]
    assert np.all(np.isfinite(ds["lin_ratio"].values)) and np.all(ds["lin_ratio"].values > 0)
    c1 = json.loads(xr.open_zarr(one / "probes.zarr").attrs["config"])
    c2 = json.loads(xr.open_zarr(fsdp / "probes.zarr").attrs["config"])
    c1["train"].pop("dist"), c2["train"].pop("dist")
    assert c1 == c2
    # The feature change since θ_0 (θ_0 gathered whole once) and the block-linearized model (θ_t
    # gathered, measured on rank 0) agree with one process too.
    assert np.all(np.isfinite(ds["feature_change"].values))
    with xr.open_zarr(one / "linearized.zarr") as a, xr.open_zarr(fsdp / "linearized.zarr") as b:
        assert a["step"].values.tolist() == b["step"].values.tolist() and a.sizes["step"] >= 1
        for name in a.data_vars:
            np.testing.assert_allclose(b[name].values, a[name].values, rtol=RTOL, err_msg=name)


def test_fsdp_checkpoint_is_the_full_model_and_loads_without_unpickling(runs):
    one, fsdp, *_ = runs
    state = torch.load(fsdp / "checkpoint.pt", weights_only=True)
    reference = torch.load(one / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20
    assert state["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():  # gathered whole tensors, not one rank's shards
        assert state["model"][name].shape == tensor.shape, name
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-4, atol=1e-6)
    # Optimizer state keyed by parameter name (torch.distributed.checkpoint's full state dict).
    assert set(state["optimizer"]["state"]) == set(reference["model"])


def test_only_rank_zero_writes_and_prints(runs):
    *_, loop_fsdp, launch = runs
    assert launch.stdout.count("run dir:") == 1
    assert sorted(p.name for p in loop_fsdp.iterdir()) == ["loop.json", "probes.zarr"]


def test_probelog_around_a_users_own_fsdp2_loop_equals_one_process(runs):
    _, _, loop_one, loop_fsdp, _ = runs
    ranks = json.loads((loop_fsdp / "loop.json").read_text())
    (single,) = json.loads((loop_one / "loop.json").read_text())
    assert len(ranks) == 2 and len(single["losses"]) == LOOP_STEPS
    for facts in ranks:
        np.testing.assert_allclose(facts["losses"], single["losses"], rtol=RTOL)
    ds = _assert_same_records(loop_one, loop_fsdp)
    assert ds["step"].values.tolist() == list(LOOP_PROBES)


def test_linearization_gathers_one_branch_at_a_time_and_splits_branches(runs):
    *_, loop_fsdp, _ = runs
    ranks = json.loads((loop_fsdp / "loop.json").read_text())
    # Peak whole parameters held by the linearization: θ_t and θ_{t+1} of the largest branch (the MLP:
    # LN 2N + fc 4N²+4N + proj 4N²+N parameters at N = 64), float32 — not the model.
    n = 64
    assert all(r["lin_gathered_peak_bytes"] == 2 * 4 * (8 * n * n + 7 * n) for r in ranks)
    # Split by cost over the 2 ranks, each branch evaluated once: layer 0 on rank 0, layer 1 on rank 1.
    assert [sorted(map(tuple, r["lin_branches_here"])) for r in ranks] == [
        [(0, "attn"), (0, "mlp")], [(1, "attn"), (1, "mlp")]]


def test_sharded_sums_are_reduced_exactly_once(runs):
    *_, loop_fsdp, _ = runs
    for facts in json.loads((loop_fsdp / "loop.json").read_text()):
        sharded, whole = facts["squared_norms"]
        direct = facts["direct_sum_of_squares"]
        assert math.isclose(sharded, direct, rel_tol=1e-6)  # shards added once: not ×2, not one half
        assert math.isclose(whole, direct, rel_tol=1e-6)  # a whole tensor is not summed over ranks


@pytest.mark.slow
def test_resume_under_fsdp_after_a_hard_kill_is_exact(runs, tmp_path):
    _, reference, *_ = runs
    out = tmp_path / "killed"
    killed = torchrun([str(REPO / "tests/scaleout/_stop_after_checkpoint.py"), "run", *ARGS, "--dist", "fsdp",
                       "--out", str(out)], cwd=tmp_path, module=False, timeout=300)
    assert killed.returncode != 0
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10
    resumed = torchrun(["run", "--resume", "--quiet", "--no-report", "--out", str(out)], cwd=tmp_path, timeout=300)
    assert_ok(resumed)
    (tr, vr), (tref, vref) = metrics(out), metrics(reference)
    assert sorted(tr) == sorted(tref) and sorted(vr) == sorted(vref)
    # Same world size, same reduction order: the resumed run continues the uninterrupted one bit for bit.
    for s in tref:
        assert tr[s]["loss"] == tref[s]["loss"], s
        assert tr[s]["grad_norm"] == tref[s]["grad_norm"], s
    assert vr == vref
    with xr.open_zarr(out / "probes.zarr") as a, xr.open_zarr(reference / "probes.zarr") as b:
        a, b = a.load(), b.load()
    assert a["step"].values.tolist() == b["step"].values.tolist()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_fsdp_on_one_process_equals_plain_training(runs, tmp_path):
    """`--dist fsdp` without torchrun: a process group of one, parameters as 1-shard DTensors."""
    one, *_ = runs
    result = CliRunner().invoke(main, ["run", *ARGS, "--dist", "fsdp", "--out", str(tmp_path / "f1")])
    assert result.exit_code == 0, result.output
    (t1, _), (tf, _) = metrics(one), metrics(tmp_path / "f1")
    for s in t1:
        assert math.isclose(tf[s]["loss"], t1[s]["loss"], rel_tol=RTOL)
        assert math.isclose(tf[s]["grad_norm"], t1[s]["grad_norm"], rel_tol=RTOL)
    _assert_same_records(one, tmp_path / "f1", ignore_attrs=("config",))
    assert not torch.distributed.is_initialized()  # the command's process group is gone again


def test_sweep_passes_dist_fsdp_to_every_run_through_the_slurm_code_path(tmp_path):
    """`diagnose sweep --dist fsdp --executor debug`: submitit's in-process executor, the code path of
    Slurm array tasks (each task joins its run's process group; here one process, one shard)."""
    out = tmp_path / "sw"
    args = ["sweep", "--width", "64", "--depth", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "2",
            "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "2", "--seed", "0,1", "--no-probes",
            "--device", "cpu", "--dist", "fsdp", "--executor", "debug", "--out", str(out)]
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert "(2 finished, 0 diverged)" in result.output
    for name in json.loads((out / "sweep.json").read_text())["runs"]:
        config = json.loads((out / name / "config.json").read_text())
        assert config["train"]["dist"] == "fsdp"
        state = torch.load(out / name / "checkpoint.pt", weights_only=True)
        assert set(state["optimizer"]["state"]) == set(state["model"])  # the sharded (by-name) checkpoint
    assert not torch.distributed.is_initialized()


def test_unknown_dist_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["run", *ARGS, "--dist", "zero3", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "'zero3' is not one of 'ddp', 'fsdp'" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_two_rank_fsdp_checkpoint_resumes_on_one_process(runs, tmp_path):
    """The checkpoint holds whole tensors, so it does not depend on the number of shards."""
    import shutil

    _, fsdp, *_ = runs
    out = tmp_path / "moved"
    shutil.copytree(fsdp, out)
    config = json.loads((out / "config.json").read_text())
    config["train"]["steps"] = 24  # four more updates
    (out / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["run", "--resume", "--quiet", "--no-report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (t, v), (_, v_ref) = metrics(out), metrics(fsdp)
    assert v[20] == v_ref[20]  # the reloaded model gives the saved model's validation loss, bit for bit
    assert sorted(t)[-4:] == [20, 21, 22, 23] and all(math.isfinite(t[s]["loss"]) for s in t)

"""`diagnose sweep --executor debug|slurm`: submitit's in-process executor runs a real 2-run sweep;
the Slurm path is checked up to `sbatch` with a stand-in `sbatch`; bad options fail in one line."""

from __future__ import annotations

import contextlib
import json
import stat

import pytest
import torch
from click.testing import CliRunner

import diagnose.sweep as sweep_mod
from diagnose.cli import main

SWEEP = ["sweep", "--width", "64", "--depth", "2", "--seq-len", "16", "--batch-size", "4", "--steps", "3",
         "--eval-every", "3", "--checkpoint-every", "3", "--log-every", "3", "--seed", "0,1", "--no-probes",
         "--device", "cpu"]


@contextlib.contextmanager
def torch_threads_restored():
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invoke(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_debug_executor_runs_a_two_run_sweep(tmp_path):
    out = tmp_path / "sw"
    result = invoke([*SWEEP, "--executor", "debug", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "submitted 2 runs (debug" in result.output and "(2 finished, 0 diverged)" in result.output
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(runs) == 2
    for name in runs:
        assert json.loads((out / name / "status.json").read_text())["state"] == "finished"
        assert json.loads((out / name / "config.json").read_text())["world_size"] == 1
    assert any((out / "submitit").iterdir())  # submitit's job logs
    again = invoke([*SWEEP, "--executor", "debug", "--out", str(out)])
    assert again.exit_code == 0 and "2 already done, 0 to run" in again.output


@pytest.mark.parametrize("threads", [1, 2])
def test_local_sweep_runs_with_the_given_threads(tmp_path, threads):
    out = tmp_path / "sw"
    with torch_threads_restored():  # one worker runs in this process
        result = invoke([*SWEEP, "--threads", str(threads), "--out", str(out)])
    assert result.exit_code == 0 and "(2 finished, 0 diverged)" in result.output, result.output
    for name in json.loads((out / "sweep.json").read_text())["runs"]:
        assert json.loads((out / name / "config.json").read_text())["torch_threads"] == threads


@pytest.mark.parametrize("executor", ["local", "debug"])
@pytest.mark.parametrize("option", [["--slurm-partition", "gpu"], ["--slurm-gpus", "1"], ["--slurm-time", "30"],
                                    ["--slurm-opt", "account=x"]])
def test_slurm_options_on_another_executor_fail(tmp_path, executor, option):
    result = invoke([*SWEEP, "--executor", executor, *option, "--out", str(tmp_path / "sw")])
    one_line_error(result, option[0], f"only applies to --executor slurm, not --executor {executor}")
    assert not (tmp_path / "sw").exists()


def test_slurm_without_sbatch_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun here, whatever the machine has
    result = invoke([*SWEEP, "--executor", "slurm", "--out", str(tmp_path / "sw")])
    one_line_error(result, "'sbatch'", "not on PATH", "--executor local")
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("opt, needle", [("acount=proj", "did you mean account"), ("qos", "KEY=VALUE"),
                                         ("partition=gpu", "use --slurm-partition")])
def test_unknown_or_malformed_slurm_option_fails(tmp_path, opt, needle):
    result = invoke([*SWEEP, "--executor", "slurm", "--slurm-opt", opt, "--out", str(tmp_path / "sw")])
    one_line_error(result, needle)


@pytest.mark.parametrize("option", ["--workers", "--threads"])
def test_local_pool_options_on_a_submitit_executor_fail(tmp_path, option):
    one_line_error(invoke([*SWEEP, "--executor", "debug", option, "2", "--out", str(tmp_path / "sw")]),
                   f"{option} only applies to --executor local")


def test_threads_must_be_positive(tmp_path):
    one_line_error(invoke([*SWEEP, "--threads", "0", "--out", str(tmp_path / "sw")]), "--threads=0")
    assert not (tmp_path / "sw").exists()


def test_sweep_under_torchrun_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(invoke([*SWEEP, "--out", str(tmp_path / "sw")]), "without torchrun")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` and `srun` stand-ins: sbatch keeps the script it was given and answers with a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\ncp "$1" "{bin_dir}/submitted.sh"\necho "Submitted batch job 4242"\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return bin_dir


def test_slurm_submits_one_job_array_with_the_options(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setattr(sweep_mod, "wait", lambda jobs, todo: [(t[2], "finished") for t in todo])
    result = invoke([*SWEEP, "--executor", "slurm", "--slurm-partition", "gpuq", "--slurm-time", "30",
                     "--slurm-gpus", "2", "--slurm-cpus", "4", "--slurm-mem", "16", "--slurm-parallel", "8",
                     "--slurm-opt", "account=proj", "--out", str(tmp_path / "sw")])
    assert result.exit_code == 0, result.output
    assert "submitted 2 runs (slurm, job array 4242" in result.output
    script = (fake_slurm / "submitted.sh").read_text()
    for line in ("--array=0-1%2", "--partition=gpuq", "--time=30", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--cpus-per-task=4", "--mem=16GB", "--account=proj", "--nodes=1"):
        assert f"#SBATCH {line}\n" in script, (line, script)


def test_slurm_gpus_must_divide_the_batch(tmp_path, fake_slurm):
    result = invoke([*SWEEP, "--executor", "slurm", "--slurm-gpus", "3", "--out", str(tmp_path / "sw")])
    one_line_error(result, "batch_size=4 is not divisible by grad_accum × world size = 1 × 3")

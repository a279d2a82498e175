"""The real `diagnose` CLI in subprocesses: `audit` against Table 1, bad input for `run`, a tiny real run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("diagnose.commands_analysis") is None:
    # diagnose/cli.py imports it at module level, so no `diagnose` command can start without it.
    pytest.skip("diagnose.commands_analysis (report/compare/check) does not exist yet; `python -m diagnose` "
                "cannot import", allow_module_level=True)


def env() -> dict[str, str]:
    # Subprocesses run from tmp_path: make the repo importable and keep them to one thread each.
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return e


def popen(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def diagnose(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    p = popen(args, cwd)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --- audit ------------------------------------------------------------------------------------------------


def table1_expectations(m_n: float, m_l: float, a: float, sigma=0.02, eta=2**-8, lam=0.1, eps=1e-12) -> dict:
    """CompleteP-family column of Table 1 (spec §1) and Eq. 40 for ε outside the blocks, by hand:
    role -> (init std, lr, wd, eps)."""
    depth_lr = m_l ** (a - 1)
    block_eps = eps / m_n * m_l**-a
    other_eps = eps / m_n
    return {
        "embedding": (sigma, eta, lam, other_eps),
        "position_embedding": (sigma, eta, lam, other_eps),
        "block_norm": (0.0, eta * depth_lr, 0.0, block_eps),
        "hidden_weight": (sigma / math.sqrt(m_n), eta / m_n * depth_lr, lam * m_n, block_eps),
        "hidden_bias": (0.0, eta * depth_lr, 0.0, block_eps),
        "final_norm": (0.0, eta, 0.0, other_eps),
        "unembedding": (sigma, eta, lam, other_eps),
    }


def test_audit_json_matches_table1(tmp_path):
    # m_N = 128/64 = 2, m_L = 8/2 = 4, α = 0.75 (via --param alpha); defaults σ 0.02, η 2^-8, λ 0.1, ε 1e-12.
    r = diagnose(["audit", "--param", "alpha", "--alpha", "0.75", "--width", "128", "--base-width", "64",
                  "--depth", "8", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    m_n, m_l, a = 2.0, 4.0, 0.75
    want = table1_expectations(m_n, m_l, a)
    rows = {row["role"]: row for row in doc["rows"]}
    assert set(rows) == set(want)
    for role, (std, lr, wd, eps) in want.items():
        row = rows[role]
        for key in ("role", "init_std", "measured_init_std", "lr", "weight_decay", "eps", "branch_multiplier",
                    "output_multiplier", "attention_scale"):
            assert key in row, (role, key)
        assert row["init_std"] == pytest.approx(std, rel=1e-12), role
        assert row["lr"] == pytest.approx(lr, rel=1e-12), role
        assert row["weight_decay"] == pytest.approx(wd, rel=1e-12), role
        # abs=0: pytest.approx's default absolute tolerance (1e-12) would accept any ε of this size.
        assert row["eps"] == pytest.approx(eps, rel=1e-12, abs=0), role
        # What the built model/optimizer have: the same numbers (and the measured std near the rule).
        assert row["measured_lr"] == pytest.approx(lr, rel=1e-12), role
        assert row["measured_eps"] == pytest.approx(eps, rel=1e-12, abs=0), role
        if std > 0:
            assert row["measured_init_std"] == pytest.approx(std, rel=0.05), role
        assert row["branch_multiplier"] == pytest.approx(m_l**-a, rel=1e-12)
        assert row["output_multiplier"] == pytest.approx(1 / m_n, rel=1e-12)
        assert row["attention_scale"] == pytest.approx(1 / 64, rel=1e-12)
        assert row["ok"] is True
    assert doc["parameterization"]["alpha"] == 0.75 and doc["label"] == "alpha=0.75"


def test_audit_text_table_small_shape(tmp_path):
    # A small stand-in for the 1024×64 shape (that one is the `slow` test below): m_N = 2, m_L = 4.
    r = diagnose(["audit", "--param", "completep", "--width", "128", "--base-width", "64", "--depth", "8"],
                 tmp_path)
    assert r.returncode == 0, r.stderr
    for role in ("embedding", "block_norm", "hidden_weight", "hidden_bias", "final_norm", "unembedding"):
        assert role in r.stdout
    assert "all ok" in r.stdout and "MISMATCH" not in r.stdout
    assert "m_N=2" in r.stdout and "m_L=4" in r.stdout and "0.25" in r.stdout  # branch multiplier 1/m_L
    assert not list(tmp_path.iterdir())  # audit writes nothing


@pytest.mark.parametrize(("rule", "scale"), [("auto", 1 / 32), ("inv-sqrt-d-head", 1 / 32**0.5)])
def test_audit_head_size_and_attention_scale(tmp_path, rule, scale):
    r = diagnose(["audit", "--param", "completep", "--width", "128", "--base-width", "64", "--depth", "4",
                  "--head-size", "32", "--attn-scale", rule, "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["parameterization"]["d_head"] == 32
    assert doc["attention_scale"] == pytest.approx(scale)


@pytest.mark.slow
def test_audit_full_size_completep(tmp_path):
    # The shape: ~800M parameters; ~1 min and ~3.5 GB on one core, hence `slow`.
    r = diagnose(["audit", "--param", "completep", "--width", "1024", "--depth", "64"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "hidden_weight" in r.stdout and "all ok" in r.stdout
    assert "m_N=4" in r.stdout and "m_L=32" in r.stdout


# --- bad input ------------------------------------------------------------------------------------------
#
# Every bad value must end in ONE line on stderr that names it, a non-zero exit, no traceback, and no
# run dir. All cases go through the real click group in-process (CliRunner: each subprocess would
# cost ~2 s of torch import on a shared 2-core box); a few go through a real `python -m diagnose`
# subprocess as well, to pin the process-level contract (exit status, stderr, nothing on disk).

# Small enough that a wrongly accepted value would still finish fast (and then fail the test).
TINY = ["--width", "64", "--depth", "2", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-report"]
BAD_RUNS = {
    "alpha-low": (["--alpha", "0.3"], "0.3"),
    "alpha-high": (["--alpha", "1.5"], "1.5"),
    "width-100": (["--width", "100"], "100"),
    "width-0": (["--width", "0"], "width=0"),
    "depth-neg": (["--depth", "-1"], "depth=-1"),
    "param-foo": (["--param", "foo"], "foo"),
    "data-missing": (["--data", "/nonexistent"], "/nonexistent"),
    "data-empty": (["--data", "{empty}"], "empty.txt"),
    "probe-every-0": (["--probe-every", "0"], "every=0"),
    "probe-lin-batch-neg": (["--probe-lin-batch", "-1"], "lin_batch_size=-1"),
    "probe-flush-seconds-0": (["--probe-flush-seconds", "0"], "flush_seconds=0"),
}


def bad_args(key: str, tmp_path: Path) -> list[str]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # The bad option comes last so that it overrides TINY's value for the same option.
    return ["run", *TINY, *[a.replace("{empty}", str(empty)) for a in BAD_RUNS[key][0]],
            "--out", str(tmp_path / "out")]


def assert_one_line_error(code: int, stderr: str, needle: str) -> None:
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("key", list(BAD_RUNS))
def test_run_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, key):
    from click.testing import CliRunner

    from diagnose.cli import main

    result = CliRunner().invoke(main, bad_args(key, tmp_path))
    # A ClickException ends in SystemExit; any other exception would be a crash with a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert_one_line_error(result.exit_code, result.stderr, BAD_RUNS[key][1])
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["alpha-low", "data-empty"])
def test_run_bad_input_in_a_real_process(tmp_path, key):
    # One value rejected while the options are parsed, one only when the Trainer opens the data.
    p = popen(bad_args(key, tmp_path), tmp_path)
    out, err = p.communicate(timeout=120)
    assert_one_line_error(p.returncode, err, BAD_RUNS[key][1])
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "needle"), [(["--param", "completep", "--alpha", "0.5"], "0.5"),
                                              (["--param", "alpha", "--alpha", "2"], "alpha=2"),
                                              (["--width", "100"], "width=100"),
                                              (["--param", "bar"], "bar")])
def test_audit_bad_input_is_one_line(args, needle):
    from click.testing import CliRunner

    from diagnose.cli import main

    result = CliRunner().invoke(main, ["audit", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert_one_line_error(result.exit_code, result.stderr, needle)


# --- a tiny real run --------------------------------------------------------------------------------------


def test_tiny_real_run_writes_the_run_dir(tmp_path):
    r = diagnose(["run", "--alpha", "1", "--width", "64", "--depth", "2", "--steps", "6", "--seq-len", "32",
                  "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3", "--probe-every", "2",
                  "--no-report", "--out", "run1"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run1"
    assert "run1" in r.stdout
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "status.json", "probes.zarr"):
        assert (run / name).exists(), name
    assert not (run / "report").exists()  # --no-report

    config = json.loads((run / "config.json").read_text())
    assert config["param"]["name"] == "alpha" and config["param"]["alpha"] == 1.0
    assert config["param"]["width"] == 64 and config["param"]["depth"] == 2
    assert config["train"]["steps"] == 6 and config["probes"]["every"] == 2

    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(6))
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 3, 6]  # every 3 steps and at the end
    assert all(math.isfinite(m.get("loss", m.get("val_loss"))) for m in metrics)

    import torch

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and "probes" in state["observers"]

    import xarray as xr

    ds = xr.open_zarr(run / "probes.zarr")
    # Probe schedule (probes/recorder.py docstring): step 0, powers of two below `every` (1), multiples
    # of `every` (2, 4) and the last step (5).
    assert ds["step"].values.tolist() == [0, 1, 2, 4, 5]
    assert ds.attrs["depth"] == 2

    # The same out dir again without --resume is refused in one line, and the run is untouched.
    from click.testing import CliRunner

    from diagnose.cli import main

    again = CliRunner().invoke(main, ["run", *TINY, "--out", str(run)])
    assert_one_line_error(again.exit_code, again.stderr, str(run))
    assert "already holds a run" in again.stderr
    assert json.loads((run / "status.json").read_text()) == status

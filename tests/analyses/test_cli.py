"""The report / compare / check commands: through click's CliRunner and as `python -m diagnose`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from diagnose.commands_analysis import check, compare, report
from tests.analyses.conftest import SynthRun, write_run

REPO = Path(__file__).resolve().parents[2]
HAS_CLI = (REPO / "diagnose" / "cli.py").is_file()


def _invoke(cmd: click.Command, *args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("cmd", [report, compare, check])
def test_every_command_and_option_has_help(cmd):
    assert cmd.help and len(cmd.help.split()) > 5
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{cmd.name} {param.opts} has no help"
    code, out, _ = _invoke(cmd, "--help")
    assert code == 0 and "Usage" in out


def test_check_verdicts_and_exit_codes(cli_sweep):
    code, out, _ = _invoke(check, cli_sweep, "--expect", "complete", "--param", "completep", "--n-boot", 100)
    assert code == 0 and out.startswith("ok: alpha=1 is complete")
    code, out, _ = _invoke(check, cli_sweep, "--expect", "lazy", "--param", "depth-mup", "--n-boot", 100)
    assert code == 0 and "alpha=0.5 is lazy" in out
    code, out, _ = _invoke(check, cli_sweep, "--expect", "complete", "--n-boot", 100)
    assert code == 1
    assert "FAIL: alpha=0.5 is lazy (expected complete)" in out and "below the lazy threshold" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expect", "complete", "--param", "sp"], "no runs for sp"),
        (["--expect", "complete", "--param", "ntk"], "unknown parameterization label"),
    ],
)
def test_check_bad_param(cli_sweep, args, message):
    code, _, err = _invoke(check, cli_sweep, *args, "--n-boot", 50)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_check_single_depth_and_not_a_run(tmp_path):
    run = write_run(tmp_path / "one", SynthRun(blocks=1, variables=("lin_ratio",)))
    code, _, err = _invoke(check, run, "--expect", "complete")
    assert code == 2 and "two or more depths" in err
    code, _, err = _invoke(check, tmp_path / "missing", "--expect", "complete")
    assert code == 2 and "missing: no such file or directory" in err


def test_report_json_and_files(cli_sweep, tmp_path):
    code, out, _ = _invoke(report, cli_sweep, "--out", tmp_path / "rep", "--json", "--n-boot", 50, "--dpi", 30)
    assert code == 0
    summary = json.loads(out)
    assert summary["laziness"]["alpha=0.5"]["verdict"] == "lazy"
    assert (tmp_path / "rep" / "lin_ratio_vs_depth.png").is_file() and (tmp_path / "rep" / "summary.md").is_file()


def test_compare_text_json_and_errors(cli_sweep, tmp_path):
    a, b = cli_sweep / "a1_d4_w64_lr-8_s0", cli_sweep / "a0.5_d8_w64_lr-8_s1"
    code, out, _ = _invoke(compare, a, b)
    assert code == 0 and "lin_ratio (mlp, geo-mean)" in out and "alpha=0.5" in out
    code, out, _ = _invoke(compare, a, b, "--json")
    table = json.loads(out)
    assert table["depth"]["b"] == 8 and table["seed"]["b/a"] is None
    other = write_run(tmp_path / "other", SynthRun(blocks=1, variables=("lin_ratio",)))
    code, _, err = _invoke(compare, a, other)
    assert code == 2 and "record different variables" in err
    (tmp_path / "plain").mkdir()
    code, _, err = _invoke(compare, a, tmp_path / "plain")
    assert code == 2 and "no probes.zarr" in err


def test_command_module_imports_no_heavy_packages():
    code = ("import sys, diagnose.commands_analysis; "
            "heavy = [m for m in ('xarray', 'pandas', 'matplotlib', 'analyses', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def _diagnose(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diagnose", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not HAS_CLI, reason="diagnose/cli.py (the command group) is not written yet")
def test_python_m_diagnose_check_fails_with_reason(cli_sweep):
    proc = _diagnose("check", cli_sweep, "--expect", "complete", "--n-boot", 100)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL: alpha=0.5 is lazy" in proc.stdout and "ok: alpha=1 is complete" in proc.stdout


@pytest.mark.skipif(not HAS_CLI, reason="diagnose/cli.py (the command group) is not written yet")
def test_python_m_diagnose_bad_input_is_one_line(tmp_path):
    proc = _diagnose("report", tmp_path / "nothing")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nothing'}: no such file or directory"]


@pytest.mark.skipif(not HAS_CLI, reason="diagnose/cli.py (the command group) is not written yet")
def test_python_m_diagnose_report_of_one_run(cli_sweep):
    run = cli_sweep / "a1_d2_w64_lr-8_s0"
    proc = _diagnose("report", run, "--n-boot", 50, "--dpi", 30)
    assert proc.returncode == 0, proc.stderr
    assert "1 run(s)" in proc.stdout and (run / "report" / "summary.md").is_file()
    assert "skipped laziness and depth coordinate check: the sweep has one depth (2)" in proc.stderr


def test_check_sp_is_never_complete_but_not_lazy_and_unstable(depth_sweep):
    # sp's planted final stream grows with depth: the verdict is not-lazy, its stability unstable.
    code, out, _ = _invoke(check, depth_sweep, "--expect", "unstable", "--param", "sp")
    assert code == 0 and out.startswith("ok: sp is not-lazy, unstable (expected unstable)")
    code, out, _ = _invoke(check, depth_sweep, "--expect", "not-lazy", "--param", "sp")
    assert code == 0
    code, out, _ = _invoke(check, depth_sweep, "--expect", "complete", "--param", "sp")
    assert code == 1 and "FAIL: sp is not-lazy, unstable (expected complete)" in out
    code, out, _ = _invoke(check, depth_sweep, "--expect", "unstable", "--param", "completep")
    assert code == 1 and "FAIL: alpha=1 is complete (expected unstable)" in out

"""The single-run report's laziness section, on a real tiny run."""

import subprocess
import sys

from tests.conform_sweeps import tiny_run


def test_single_run_report_shows_the_three_measures_and_the_sweep_command(tmp_path):
    run = tiny_run(tmp_path / "run", depth=2, steps=4, linearized=1)
    proc = subprocess.run([sys.executable, "-m", "diagnose", "report", str(run), "--n-boot", "20"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = (run / "report" / "summary.md").read_text()
    assert "## Laziness in this run" in text
    for measure in ("lin_ratio", "feature_change", "1-feature_cka"):
        assert f"| {measure} | attn |" in text and f"| {measure} | mlp |" in text
    assert "| 3 |" in text and "blocks' share" in text  # the block-linearized model at the last step's θ
    assert "A lazy model shows" in text and "A complete (CompleteP) model" in text
    command = next(line for line in text.splitlines() if line.startswith("diagnose sweep"))
    assert "--param alpha --alpha 1" in command and "--depth 1,2,4,8" in command and "--width 32" in command
    assert (run / "report" / "laziness_by_layer.png").stat().st_size > 1000
    # The command is one `diagnose sweep` accepts (its options parse; --help stops before running).
    args = command.split()[1:] + ["--help"]
    check = subprocess.run([sys.executable, "-m", "diagnose", *args], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr

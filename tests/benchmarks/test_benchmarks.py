"""The benchmarks run end to end on a tiny CPU config and report every promised key (no timed asserts)."""

import json
import math

import torch

from benchmarks.__main__ import main as bench_main
from benchmarks.gpu import dynamo_counts
from benchmarks.gpu import main as gpu_main
from benchmarks.reference import ReferenceGPT
from benchmarks.suite import HEADLINE_KEYS
from benchmarks.timing import interleaved
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

TINY = ["--width", "64", "--depth", "1", "--seq-len", "16", "--batch-size", "2", "--probe-batch", "2",
        "--repeats", "2", "--window-repeats", "1", "--warmup-steps", "1", "--log-every", "5"]


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_cli_writes_every_headline_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(["--quick", *TINY, "--params", "sp,completep", "--json", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    for key in HEADLINE_KEYS:
        assert _positive_finite(result[key]), (key, result[key])
    assert result["device"] and result["torch_version"] == torch.__version__
    assert set(result["trainer_vs_reference_by_param"]) == {"sp", "completep"}
    details = result["probe_details"]
    for key in ("probe_step_vs_step", "linearization_vs_step", "linearization_full_batch_vs_step",
                "probe_overhead_k10", "probe_overhead_k100", "probe_overhead_k10_windows",
                "probe_overhead_k100_windows"):
        assert details[key]["wall"]["n"] >= 1 and _positive_finite(details[key]["cpu"]["median"])
    # The headline overhead is composed from the probe-step ratio: one probe step's extra cost per k steps.
    step = details["probe_step_vs_step"]["wall"]["median"]
    for k in (10, 100):
        share = details[f"store_append_ms_per_probe_step_k{k}"] / details["plain_step_ms"]
        assert math.isclose(result[f"probe_overhead_k{k}"], 1 + (step - 1 + share) / k, rel_tol=1e-9)
        assert _positive_finite(details[f"plain_step_in_probed_run_vs_step_k{k}"])
    assert details["linearization_dtype"] == "float64"  # the CPU default is kept
    assert details["linearization_peak_mib"] > 0


def test_gpu_script_quick_on_cpu_has_no_graph_breaks_with_probes(tmp_path):
    assert gpu_main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    for key in HEADLINE_KEYS:
        assert _positive_finite(result[key]), (key, result[key])
    assert result["compile_backend"] == "eager"
    # Probe steps ran between compiled steps: no graph break and no recompilation (one graph per model).
    assert result["dynamo"]["graph_breaks"] == 0, result["dynamo"]["graph_break_reasons"]
    assert result["dynamo"]["unique_graphs"] == 2


def test_graph_break_counter_sees_a_break():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def f(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(f, backend="eager")(torch.ones(3))
    assert dynamo_counts()["graph_breaks"] == 1


def test_reference_model_has_the_same_size():
    ours = GPT(Parameterization(width=128, depth=3), ModelConfig(seq_len=32))
    ref = ReferenceGPT(128, 3, 32)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in ref.parameters())


def test_interleaved_alternates_order_and_runs_setup_untimed():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, torch.device("cpu"),
                        setup={"b": lambda: calls.append("setup-b")})
    assert calls == ["a", "setup-b", "b", "setup-b", "b", "a", "a", "setup-b", "b"]
    assert len(times.wall["a"]) == len(times.cpu["b"]) == 3

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


def _within(value: float, summary: dict) -> bool:
    """`value` within the summary's min–max (relative slack for round-off only)."""
    return summary["min"] * (1 - 1e-12) <= value <= summary["max"] * (1 + 1e-12)


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
    # Checks by another route than the suite's own formulas (no timing tolerance: each is exact).
    # 1. With 2 repeats a median is the mean of the two, so the ratio of the separately summarized step
    #    times (ms fields) is the mediant of the per-repeat ratios and must lie within their min-max:
    #    a ratio of the wrong pair, the wrong way round or of another clock falls outside.
    assert details["probe_step_vs_step"]["wall"]["n"] == 2
    assert _within(details["probe_step_ms"] / details["plain_step_ms"], details["probe_step_vs_step"]["wall"])
    for name, r in result["trainer_vs_reference_by_param"].items():
        assert _within(r["ours"]["ms_per_step"] / r["reference"]["ms_per_step"], r["wall"]), name
        # Throughput units: tokens per step is batch × sequence length, as passed on the command line.
        assert math.isclose(r["ours"]["tokens_per_s"] * r["ours"]["ms_per_step"] / 1e3, 2 * 16, rel_tol=1e-9)
    # 2. The headline is the worst parameterization, as documented, and named.
    by_param = {n: r["wall"]["median"] for n, r in result["trainer_vs_reference_by_param"].items()}
    assert result["trainer_vs_reference"] == max(by_param.values())
    assert result["trainer_vs_reference_worst"] == max(by_param, key=by_param.get)
    # 3. Both overhead headlines amortize one and the same probe-step excess, each over its own k:
    #    (overhead_k − 1)·k − store share_k is equal at k = 10 and 100 and lies within the per-repeat
    #    range of (probe step / plain step − 1). A wrong k, a mixed clock or a share counted twice
    #    breaks the equality; an excess that is not the probe step's leaves the range.
    excess = [(result[f"probe_overhead_k{k}"] - 1) * k
              - details[f"store_append_ms_per_probe_step_k{k}"] / details["plain_step_ms"] for k in (10, 100)]
    assert math.isclose(excess[0], excess[1], rel_tol=1e-9, abs_tol=1e-12)
    step = details["probe_step_vs_step"]["wall"]
    assert step["min"] - 1 - 1e-9 <= excess[0] <= step["max"] - 1 + 1e-9
    for k in (10, 100):
        assert details[f"store_append_ms_per_probe_step_k{k}"] <= details["store_append_ms"] + 1e-12
        assert _positive_finite(details[f"plain_step_in_probed_run_vs_step_k{k}"])
    assert _positive_finite(details["store_create_ms"]) and _positive_finite(details["store_append_ms"])
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

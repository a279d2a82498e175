"""The benchmark suite: the real training step against a reference loop, probe overhead, linearization cost.

Every comparison runs both sides in this process, interleaved (see `benchmarks.timing`), after an
untimed warm-up (the first steps, compilation, and torch.func's first call, which costs seconds);
each result is a time ratio ours / baseline, the median over repeats with its min–max spread.

- trainer_vs_reference: `Trainer.train_step` (Table 1 groups, multipliers, schedule, hook sites,
  metrics buffer flushed every `log_every` steps, driven as `Trainer.run` drives it) against
  `benchmarks.reference.ReferenceLoop`, per parameterization; the headline is the worst one.
- probe_step_vs_step: one training step with a probe step (the recorder's before_update and
  after_update: probe forward/backward, linearization, statistics, host transfer) against one plain
  step. The recorder's zarr append is timed on its own (the store's creation, once per run, apart),
  and shared over the probe steps that one append carries in a run probing every k steps
  (`flush_every`, or fewer when `flush_seconds` pass first).
- probe_overhead_k{k}: the amortized overhead of probing every k steps, 1 + (probe step / plain step
  − 1 + store-append share) / k, per interleaved repeat of the pair above. Cross-checks: the same run
  in windows of k steps with probes off or one probe step per window (`_windows`; at k = 100 the
  99 plain steps in both arms add a few percent of noise on a shared machine), and the plain steps
  of the probed windows against those of the plain windows (`plain_step_in_probed_run_vs_step_k{k}`,
  CPU: 1.00 when a probe step leaves no slowdown behind, the composition's assumption).
- linearization_vs_step: one full linearization measurement (every layer, both branches, in the
  session's dtype, on the recorder's `lin_batch` sequences) against one training step, and the peak
  memory of each; `linearization_full_batch_vs_step` is the same over the whole probe batch.
Data are synthetic tokens made once on the device (`benchmarks.synthetic`).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.hardware import device_name, peak_memory, peak_tflops
from benchmarks.reference import ReferenceGPT, ReferenceLoop
from benchmarks.synthetic import SyntheticTokens
from benchmarks.timing import interleaved, summarize
from probes.hooks import capture
from probes.probe_log import ProbeLog
from probes.recorder import ProbeConfig, ProbeRecorder
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig, flops_per_token
from trainer.parameterization import Parameterization, resolve_name

HEADLINE_KEYS = ("trainer_vs_reference", "probe_overhead_k10", "probe_overhead_k100", "linearization_vs_step")


@dataclass(frozen=True)
class BenchConfig:
    """Model shape and timing plan. Defaults: the CPU targets' tiny model."""

    width: int = 128  # residual-stream width N
    depth: int = 4  # transformer blocks L
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 16  # training sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step
    probe_batch: int = 8  # sequences in the probe batch (ProbeConfig's default)
    lin_batch: int = ProbeConfig.lin_batch_size  # of which the linearization error uses (0: all)
    params: tuple[str, ...] = ("sp", "mup", "depth-mup", "completep")  # parameterizations vs the reference
    probe_param: str = "completep"  # parameterization of the probe and linearization runs
    log_every: int = 10  # steps between host transfers of the loss (both loops)
    block_steps: int = 1  # steps per timed block, trainer vs reference
    repeats: int = 21  # interleaved repeats: trainer vs reference, probe step, linearization
    k_values: tuple[int, ...] = (10, 100)  # probe every k steps
    window_repeats: int = 7  # interleaved (off, on) window pairs at the largest k; smaller k get as many
    # more as cover the same number of steps, up to `repeats` (short windows are the noisier ones)
    warmup_steps: int = 3  # untimed steps before any timing
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # training precision, as TrainConfig.dtype (auto: bf16 autocast on CUDA)
    compile: bool = False  # torch.compile the training model (and the reference)
    compile_backend: str = "inductor"  # torch.compile backend (eager: Dynamo only, for CPU tests)
    threads: int = 1  # CPU threads (0: torch's default); one keeps ratios steady on a shared machine


# `python -m benchmarks --quick`: a smaller model and fewer repeats (about a minute on one CPU core).
QUICK = BenchConfig(width=64, depth=2, seq_len=64, batch_size=8, probe_batch=4, log_every=5, repeats=9,
                    window_repeats=2, warmup_steps=2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parameterization(name: str, bench: BenchConfig) -> Parameterization:
    """A named parameterization (sp, mup, depth-mup, completep, alpha) at the benchmark's shape."""
    base, alpha = resolve_name(name, None)
    return Parameterization(name=base, alpha=alpha, width=bench.width, depth=bench.depth)


class TrainerRunner:
    """Drives `Trainer.train_step` as `Trainer.run` does (metrics flushed every log_every steps),
    without validation or checkpoints; `trainer.observers` decides which steps are probed."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        # When a list: (label, probed, seconds) per step. CPU only (a per-step CUDA sync would distort).
        self.step_log: list[tuple[str, bool, float]] | None = None
        self.label = ""

    def run(self, n: int) -> None:
        t = self.trainer
        for _ in range(n):
            step = t.step
            if self.step_log is not None:
                probed, t0 = any(o.wants(step) for o in t.observers), time.perf_counter()
            t.train_step(step)
            t.step = step + 1
            if t.step % t.spec.train.log_every == 0:
                t.flush_metrics()
            if self.step_log is not None:
                self.step_log.append((self.label, probed, time.perf_counter() - t0))

    def align(self, k: int) -> None:
        """Plain steps up to the next multiple of k (where a recorder with every=k probes)."""
        observers, self.trainer.observers = self.trainer.observers, []
        self.run(-self.trainer.step % k)
        self.trainer.observers = observers


def make_trainer(bench: BenchConfig, param_name: str, run_dir: Path) -> Trainer:
    """A Trainer at the benchmark's shape, fed synthetic tokens on its device."""
    train = TrainConfig(steps=10**7, batch_size=bench.batch_size, grad_accum=bench.grad_accum,
                        log_every=bench.log_every, device=bench.device, dtype=bench.dtype,
                        compile=bench.compile and bench.compile_backend == "inductor")
    spec = RunSpec(param=parameterization(param_name, bench), model=ModelConfig(seq_len=bench.seq_len), train=train)
    trainer = Trainer(spec, run_dir, quiet=True)
    if bench.compile and bench.compile_backend != "inductor":
        trainer.train_model = torch.compile(trainer.model, backend=bench.compile_backend)
    trainer.data = SyntheticTokens(bench.seq_len, trainer.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    return trainer


def make_reference(bench: BenchConfig, device: torch.device) -> Callable[[int], None]:
    """A function running n steps of the reference loop on its own synthetic tokens."""
    bf16 = bench.dtype == "bfloat16" or (bench.dtype == "auto" and device.type == "cuda")
    loop = ReferenceLoop(ReferenceGPT(bench.width, bench.depth, bench.seq_len), device, grad_accum=bench.grad_accum,
                         log_every=bench.log_every, bf16=bf16, compile_model=bench.compile,
                         compile_backend=bench.compile_backend)
    data = SyntheticTokens(bench.seq_len, device)

    def run(n: int) -> None:
        for _ in range(n):
            loop.step(data.batch(loop.n, bench.batch_size))

    return run


def throughput(seconds: list[float], steps: int, bench: BenchConfig, param: Parameterization,
               device: torch.device) -> dict[str, Any]:
    """ms/step and tokens/s from the median block time; TFLOP/s and MFU on a GPU of the peak table."""
    per_step = summarize(seconds)["median"] / steps
    tokens_per_s = bench.batch_size * bench.seq_len / per_step
    out: dict[str, Any] = {"ms_per_step": 1e3 * per_step, "tokens_per_s": tokens_per_s}
    peak = peak_tflops(device)
    if peak is not None:
        tflops = flops_per_token(param, bench.seq_len) * tokens_per_s / 1e12
        out.update(tflops=tflops, mfu=tflops / peak, peak_tflops=peak)
    return out


def _compare_with_reference(bench: BenchConfig, name: str, run_dir: Path,
                            reference: Callable[[int], None] | None) -> tuple[dict[str, Any], Callable[[int], None]]:
    t0 = time.perf_counter()
    trainer = make_trainer(bench, name, run_dir / f"train-{name}")
    runner = TrainerRunner(trainer)
    runner.run(bench.warmup_steps)  # compiles, when compiling
    warmup_s = {"ours": time.perf_counter() - t0}
    if reference is None:
        t0 = time.perf_counter()
        reference = make_reference(bench, trainer.device)
        reference(bench.warmup_steps)
        warmup_s["reference"] = time.perf_counter() - t0
    cases = {"ours": lambda: runner.run(bench.block_steps), "reference": lambda: reference(bench.block_steps)}
    times = interleaved(cases, bench.repeats, trainer.device)
    param = trainer.spec.param
    result = {
        **times.ratio("ours", "reference"),
        "ours": throughput(times.wall["ours"], bench.block_steps, bench, param, trainer.device),
        "reference": throughput(times.wall["reference"], bench.block_steps, bench, param, trainer.device),
        "warmup_s": warmup_s,
    }
    return result, reference


def trainer_vs_reference(bench: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """Per parameterization: our step against the reference step, in interleaved blocks of steps."""
    results: dict[str, Any] = {}
    reference = None
    for name in bench.params:
        results[name], reference = _compare_with_reference(bench, name, run_dir, reference)
    return results


class _FlushTimer:
    """Times a ProbeLog's store appends (instrumentation only: its flush runs unchanged)."""

    def __init__(self, log: ProbeLog):
        self.log, self.flush = log, log.flush
        self.seconds: list[float] = []  # per append that wrote rows
        log.flush = self  # the log calls self.flush(): this instance attribute takes precedence

    def __call__(self) -> None:
        rows = self.log.pending
        t0 = time.perf_counter()
        self.flush()
        if rows:
            self.seconds.append(time.perf_counter() - t0)


def probe_costs(bench: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """Probe step vs plain step, windows of k steps with probes on/off, and the linearization alone."""
    trainer = make_trainer(bench, bench.probe_param, run_dir / "probes")
    device = trainer.device
    runner = TrainerRunner(trainer)
    recorders = {
        k: ProbeRecorder(ProbeConfig(every=k, early=False, batch_size=bench.probe_batch,
                                     lin_batch_size=bench.lin_batch), run_dir / f"probes-k{k}", trainer.spec)
        for k in bench.k_values
    }
    # Untimed warm-up: plain steps, then one probe step per recorder (torch.func's first call takes seconds).
    runner.run(bench.warmup_steps)
    creates = []
    for k, rec in recorders.items():
        runner.align(k)
        trainer.observers = [rec]
        runner.run(1)
        # The store's first write creates it (once per run, like the imports): timed apart, so that the
        # appends timed below are the ones a run makes every `flush_every` probe steps.
        t0 = time.perf_counter()
        rec.flush()
        creates.append(time.perf_counter() - t0)
    trainer.observers = []
    flushes = [_FlushTimer(rec.log) for rec in recorders.values()]  # the logs exist after a probe step
    out: dict[str, Any] = {"probe_batch": bench.probe_batch, "lin_batch": bench.lin_batch or bench.probe_batch,
                           "store_create_ms": 1e3 * summarize(creates)["median"]}

    def use(observers: list, k: int | None = None, label: str = "") -> Callable[[], None]:
        def setup() -> None:
            if k is not None:
                runner.align(k)
            trainer.observers = observers
            runner.label = label
        return setup

    # One probe step against one plain step.
    k0 = min(bench.k_values)
    step_times = interleaved({"plain": lambda: runner.run(1), "probe": lambda: runner.run(1)}, bench.repeats,
                             device, setup={"plain": use([]), "probe": use([recorders[k0]], k0)})
    out["probe_step_vs_step"] = step_times.ratio("probe", "plain")
    plain_s = summarize(step_times.wall["plain"])["median"]
    out["plain_step_ms"] = 1e3 * plain_s
    out["probe_step_ms"] = 1e3 * summarize(step_times.wall["probe"])["median"]

    # Cross-check: the same run in windows of k steps, probes off or one probe step per window. The
    # k - 1 plain steps are the same in both arms and only add noise, so at k = 100 these medians are
    # a few percent wide here; the per-step log checks that steps after a probe step are not slower.
    if device.type == "cpu":
        runner.step_log = []
    for k, rec in recorders.items():
        pairs = max(bench.window_repeats, min(bench.repeats, bench.window_repeats * max(bench.k_values) // k))
        times = interleaved({"off": lambda k=k: runner.run(k), "on": lambda k=k: runner.run(k)}, pairs, device,
                            setup={"off": use([], k, f"off{k}"), "on": use([rec], k, f"on{k}")})
        out[f"probe_overhead_k{k}_windows"] = times.ratio("on", "off")
        if runner.step_log is not None:
            after = [dt for label, probed, dt in runner.step_log if label == f"on{k}" and not probed]
            off = [dt for label, _, dt in runner.step_log if label == f"off{k}"]
            out[f"plain_step_in_probed_run_vs_step_k{k}"] = summarize(after)["median"] / summarize(off)["median"]
    runner.step_log = None
    trainer.observers = []

    # The store appends: about the same cost whatever they carry; a run with probes every k steps
    # appends every `flush_every` probe steps, or every `flush_seconds` when that comes first.
    for rec in recorders.values():
        rec.close()
    appends = [t for f in flushes for t in f.seconds]
    append_s = summarize(appends)["median"] if appends else 0.0
    out["store_append_ms"] = 1e3 * append_s
    for k, rec in recorders.items():
        rows = min(rec.config.flush_every, max(1, math.ceil(rec.config.flush_seconds / (k * plain_s))))
        out[f"store_append_ms_per_probe_step_k{k}"] = 1e3 * append_s / rows
        # Amortized overhead of one probe step (and its share of a store append) per k steps, per
        # interleaved repeat of the probe-step-vs-step pair: 1 + (probe step / plain step − 1 + share) / k.
        share = append_s / rows / plain_s
        per_repeat = {clock: [1 + (p / q - 1 + share) / k for p, q in zip(getattr(step_times, clock)["probe"],
                                                                           getattr(step_times, clock)["plain"])]
                      for clock in ("wall", "cpu")}
        out[f"probe_overhead_k{k}"] = {clock: summarize(v) for clock, v in per_repeat.items()}

    # One full linearization measurement (all layers, both branches) against one training step.
    session = recorders[k0].session
    adapter = session.adapter
    was_training = adapter.model.training
    adapter.model.eval()
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(session.batch)
    adapter.model.train(was_training)
    acts = {key: a.detach().float().clone() for key, a in acts.items()}
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    runner.run(1)
    after = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    measure = lambda: session.linearization(acts, before, after)  # noqa: E731
    measure()
    times = interleaved({"linearization": measure, "step": lambda: runner.run(1)}, bench.repeats, device)
    out["linearization_vs_step"] = times.ratio("linearization", "step")
    out["linearization_ms"] = 1e3 * summarize(times.wall["linearization"])["median"]
    out["linearization_dtype"] = str(session.dtype).removeprefix("torch.")
    out["linearization_peak_mib"] = peak_memory(measure, device) / 2**20
    lin_batch_size, session.lin_batch_size = session.lin_batch_size, None
    try:
        times = interleaved({"linearization": measure, "step": lambda: runner.run(1)}, bench.repeats, device)
        out["linearization_full_batch_vs_step"] = times.ratio("linearization", "step")
    finally:
        session.lin_batch_size = lin_batch_size
    out["step_peak_mib"] = peak_memory(lambda: runner.run(1), device) / 2**20
    out["host_syncs_in_step"] = host_syncs_in_step(runner)
    return out


def host_syncs_in_step(runner: TrainerRunner) -> int | None:
    """Synchronising CUDA calls in one plain training step that does not log (None off CUDA)."""
    trainer = runner.trainer
    if trainer.device.type != "cuda":
        return None
    trainer.observers = []
    runner.align(trainer.spec.train.log_every)
    runner.run(1)  # the next step is not a logging step
    torch.cuda.synchronize(trainer.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.run(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_suite(bench: BenchConfig, parts: tuple[str, ...] = ("trainer", "probes")) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready results: headline ratios plus details."""
    if bench.threads > 0:
        torch.set_num_threads(bench.threads)
    device = resolve_device(bench.device)
    result: dict[str, Any] = {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": asdict(bench),
        "flops_per_token": flops_per_token(parameterization(bench.probe_param, bench), bench.seq_len),
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if "trainer" in parts:
            per_param = trainer_vs_reference(bench, Path(tmp))
            worst = max(per_param, key=lambda n: per_param[n]["wall"]["median"])
            result["trainer_vs_reference"] = per_param[worst]["wall"]["median"]
            result["trainer_vs_reference_worst"] = worst
            result["trainer_vs_reference_by_param"] = per_param
        if "probes" in parts:
            costs = probe_costs(bench, Path(tmp))
            for k in bench.k_values:
                result[f"probe_overhead_k{k}"] = costs[f"probe_overhead_k{k}"]["wall"]["median"]
            result["linearization_vs_step"] = costs["linearization_vs_step"]["wall"]["median"]
            result["probe_step_vs_step"] = costs["probe_step_vs_step"]["wall"]["median"]
            result["probe_details"] = costs
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary of `run_suite`'s result: one line per ratio, wall and CPU clocks."""
    lines = [f"device {result['device']}  torch {result['torch_version']}  threads {result['threads']}"]

    def row(label: str, r: dict[str, Any]) -> None:
        w, c = r["wall"], r["cpu"]
        lines.append(f"  {label:<34} {w['median']:7.3f}  [{w['min']:.3f}, {w['max']:.3f}]  n={w['n']:<3} "
                     f"cpu-time {c['median']:.3f}")

    lines.append("  ratio (ours / baseline)            median  [min, max]")
    for name, r in result.get("trainer_vs_reference_by_param", {}).items():
        row(f"trainer vs reference ({name})", r)
        lines.append(f"    ours {r['ours']['ms_per_step']:.1f} ms/step, {r['ours']['tokens_per_s']:,.0f} tok/s; "
                     f"reference {r['reference']['ms_per_step']:.1f} ms/step"
                     + (f"; MFU {r['ours']['mfu']:.1%}" if "mfu" in r["ours"] else ""))
    costs = result.get("probe_details")
    if costs:
        row("probe step vs step", costs["probe_step_vs_step"])
        for k in result["config"]["k_values"]:
            row(f"overhead k = {k}", costs[f"probe_overhead_k{k}"])
            lines.append(f"    store append {costs['store_append_ms']:.0f} ms, "
                         f"{costs[f'store_append_ms_per_probe_step_k{k}']:.1f} ms per probe step"
                         + (f" (creating the store: {costs['store_create_ms']:.0f} ms once per run)"
                            if "store_create_ms" in costs else ""))
            row("  cross-check: windows", costs[f"probe_overhead_k{k}_windows"])
            if f"plain_step_in_probed_run_vs_step_k{k}" in costs:
                lines.append(f"    plain steps of the probed windows vs plain windows: "
                             f"{costs[f'plain_step_in_probed_run_vs_step_k{k}']:.3f}")
        row(f"linearization vs step ({costs['lin_batch']} seq)", costs["linearization_vs_step"])
        row(f"  ... whole probe batch ({costs['probe_batch']} seq)", costs["linearization_full_batch_vs_step"])
        lines.append(f"    peak memory: linearization {costs['linearization_peak_mib']:.1f} MiB, "
                     f"step {costs['step_peak_mib']:.1f} MiB ({costs['linearization_dtype']})")
    return "\n".join(lines)

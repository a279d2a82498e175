"""What the training-health statistics add to a probe step: `python -m benchmarks.health`.

One process, the benchmark suite's CPU model (width 128, depth 4, seq 128, train batch 16, probe
batch 8): a plain training step, a probe step without the health statistics and a probe step with
them, interleaved (ABBA) over repeats after an untimed warm-up. Reported per repeat and summarised by
the median with the min-max spread: probe step / plain step for three probe sets (no health
statistics; the cheap ones; all), and the amortized overhead of probing every k steps,
1 + (probe step / plain step - 1) / k (the store append, about 4 ms per probe step at k = 10 and the
same with or without these statistics, is left out; see RESULTS.md), plus the health statistics'
own time by group (attention, activations, Adam, spectra) against a plain step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import probes.health as health
from benchmarks.suite import BenchConfig, TrainerRunner, make_trainer
from benchmarks.timing import interleaved, summarize
from probes.hooks import capture
from probes.recorder import ProbeConfig, ProbeRecorder


def run(bench: BenchConfig, repeats: int, run_dir: Path) -> dict:
    torch.set_num_threads(bench.threads or torch.get_num_threads())
    trainer = make_trainer(bench, bench.probe_param, run_dir / "train")
    runner = TrainerRunner(trainer)
    # Three probe sets: none of the health statistics; the cheap ones only (Adam, spectra: what a probe
    # step between two `health_every` steps records); all of them (what a step at the cadence records).
    variants = {"probe": dict(health=False), "probe_cheap": dict(health_every=10**9),
                "probe_full": dict(health_every=1)}
    recorders = {
        name: ProbeRecorder(ProbeConfig(every=1, early=False, batch_size=bench.probe_batch,
                                        lin_batch_size=bench.lin_batch, **kw), run_dir / name, trainer.spec)
        for name, kw in variants.items()
    }
    runner.run(bench.warmup_steps)
    for rec in recorders.values():  # untimed first probe steps (torch.func's first call; the full health step 0)
        trainer.observers = [rec]
        runner.run(2)

    def use(observers):
        return lambda: setattr(trainer, "observers", observers)

    cases = {name: (lambda: runner.run(1)) for name in ("plain", *recorders)}
    setup = {"plain": use([]), **{name: use([rec]) for name, rec in recorders.items()}}
    times = interleaved(cases, repeats, trainer.device, setup=setup)
    trainer.observers = []
    out: dict = {"repeats": repeats, "threads": torch.get_num_threads(),
                 "plain_step_ms": 1e3 * summarize(times.wall["plain"])["median"]}
    for name in recorders:
        out[f"{name}_vs_step"] = times.ratio(name, "plain")
    # Amortized overhead of probing every k steps (store appends left out), per repeat, by CPU time
    # (the wall clock of a loaded shared machine is the noisier): without the health statistics, with
    # all of them at every probe step, and with the default cadence (the full set every HEALTH_EVERY
    # steps, the cheap set at the other probe steps).
    cpu = times.cpu
    for k in (10, 100):
        full_every = max(1, health.HEALTH_EVERY // k)  # probe steps per full health step
        arms = {"none": [1 + (p / q - 1) / k for p, q in zip(cpu["probe"], cpu["plain"])],
                "all_every_probe_step": [1 + (f / q - 1) / k for f, q in zip(cpu["probe_full"], cpu["plain"])],
                "default_cadence": [1 + ((c / q - 1) * (full_every - 1) + (f / q - 1)) / (k * full_every)
                                    for c, f, q in zip(cpu["probe_cheap"], cpu["probe_full"], cpu["plain"])]}
        for arm, values in arms.items():
            out[f"overhead_k{k}_{arm}"] = summarize(values)

    # The health statistics by group, on one probe step's inputs, against a plain step.
    adapter = recorders["probe_full"].session.adapter
    model, batch, depth = adapter.model, recorders["probe_full"].session.batch, adapter.depth
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    acts = {key: a.detach().float().clone() for key, a in acts.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner.run(1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    roles = adapter.parameter_roles()
    layers = {n: adapter.layer_of(n) for n in roles}
    matrices = health.hidden_matrices(roles, health.block_pattern(adapter))
    state: dict = {}
    health.spectral_statistics(before, after, matrices, depth, state)  # warm: the cadence of a run
    groups = {
        "attention": lambda: health.attention_statistics(adapter, acts, batch, before),
        "activations": lambda: health.activation_statistics(acts, depth),
        "adam": lambda: health.adam_statistics(model, trainer.optimizer, roles, layers, depth),
        "spectra": lambda: health.spectral_statistics(before, after, matrices, depth, dict(state)),
    }
    group_times = interleaved({**groups, "step": lambda: runner.run(1)}, repeats, trainer.device)
    for name in groups:
        out[f"{name}_vs_step"] = group_times.ratio(name, "step")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.health", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="a smaller model (width 64, depth 2)")
    args = p.parse_args(argv)
    bench = BenchConfig(width=64, depth=2, seq_len=64, batch_size=8, probe_batch=4) if args.quick else BenchConfig()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(bench, args.repeats, Path(tmp))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

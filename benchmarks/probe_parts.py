"""Where a probe step's time goes: CPU time and dispatched aten ops per part of `ProbeSession`.

    python -m benchmarks.probe_parts --quick      # the `--quick` shape (width 64, depth 2)
    python -m benchmarks.probe_parts              # the default shape (width 128, depth 4)

A Trainer at the benchmark's shape probes every step (health on its default cadence: the non-full
path, as at most probe steps). The parts are timed by wrapping the session's own methods and the
statistic functions it calls (instrumentation only: the wrapped functions run unchanged). Ops are
counted in a separate step under a `TorchDispatchMode` (every aten op that reaches the dispatcher
below autograd, backward included), since counting slows the step. Times are CPU seconds of this
process (one thread), the median over `--steps` probe steps, in plain training steps measured in
the same run (interleaved: plain, probe, plain, probe, ...).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import probes.session as session_module
from benchmarks.suite import QUICK, BenchConfig, TrainerRunner, make_trainer
from probes.recorder import ProbeConfig, ProbeRecorder

PARTS = ("before_update", "linearization", "feature_change", "builtin_statistics", "health_statistics")


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name under the current part label."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "other"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.part][str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class PartTimer:
    """Wraps a ProbeSession's parts: CPU seconds per call, and the op counter's label while inside."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)
        self.counter: OpCounter | None = None
        self._depth = 0

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = self._depth == 0
            self._depth += 1
            label = self.counter.part if self.counter else None
            if self.counter:
                self.counter.part = name
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if outer:
                    self.seconds[name].append(time.process_time() - t0)
                if self.counter:
                    self.counter.part = label
        return timed


@contextlib.contextmanager
def instrumented(session: Any, timer: PartTimer) -> Iterator[None]:
    """The session's parts wrapped by `timer` inside the block (the module-level functions restored after)."""
    session.before_update = timer.wrap("before_update", session.before_update)
    session.linearization = timer.wrap("linearization", session.linearization)
    session.features.measure = timer.wrap("feature_change", session.features.measure)
    saved = {name: getattr(session_module, name) for name in ("builtin_statistics", "health_statistics")}
    try:
        for name, fn in saved.items():
            setattr(session_module, name, timer.wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(session_module, name, fn)
        for name in ("before_update", "linearization"):
            delattr(session, name)  # the instance attributes shadowed the class's methods
        del session.features.measure


def run(bench: BenchConfig, steps: int) -> dict[str, Any]:
    """Per-part CPU ms (median over `steps` probe steps), in plain steps, and op counts of one probe step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(bench.threads, 1))
    try:
        return _run(bench, steps)
    finally:
        torch.set_num_threads(threads)


def _run(bench: BenchConfig, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(bench, bench.probe_param, Path(tmp) / "run")
        runner = TrainerRunner(trainer)
        rec = ProbeRecorder(ProbeConfig(every=1, early=False, batch_size=bench.probe_batch,
                                        lin_batch_size=bench.lin_batch, flush_every=10**6, flush_seconds=1e9),
                            Path(tmp) / "probes", trainer.spec)
        runner.run(bench.warmup_steps)
        trainer.observers = [rec]
        runner.run(2)  # the first probe steps set up the session and torch.func
        timer = PartTimer()
        with instrumented(rec.session, timer):
            plain, probe = [], []
            for _ in range(steps):
                for observers, out in (([], plain), ([rec], probe)):
                    trainer.observers = observers
                    c0 = time.process_time()
                    runner.run(1)
                    out.append(time.process_time() - c0)
            counter = OpCounter()
            timer.counter = counter
            with counter:
                trainer.observers = []
                counter.part = "plain_step"
                runner.run(1)
                trainer.observers = [rec]
                counter.part = "probe_step_rest"
                runner.run(1)
        trainer.observers = []
        rec.close()
    step_s = statistics.median(plain)
    parts = {name: statistics.median(timer.seconds[name]) for name in PARTS}
    ops = {name: sum(c.values()) for name, c in counter.counts.items()}
    ops["probe_step"] = sum(v for k, v in ops.items() if k != "plain_step")
    return {"plain_step_ms": 1e3 * step_s, "probe_step_ms": 1e3 * statistics.median(probe),
            "probe_step_in_steps": statistics.median(probe) / step_s,
            "parts_ms": {k: 1e3 * v for k, v in parts.items()},
            "parts_in_steps": {k: v / step_s for k, v in parts.items()},
            "ops": ops, "top_ops": {k: c.most_common(14) for k, c in counter.counts.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe_parts", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the --quick shape (width 64, depth 2)")
    p.add_argument("--steps", type=int, default=20, help="probe steps timed (each next to a plain step)")
    args = p.parse_args(argv)
    out = run(QUICK if args.quick else BenchConfig(), args.steps)
    print(f"plain step {out['plain_step_ms']:.2f} ms CPU; probe step {out['probe_step_ms']:.2f} ms "
          f"= {out['probe_step_in_steps']:.2f} plain steps")
    print(f"{'part':24s} {'ms':>7s} {'steps':>6s} {'ops':>6s}")
    for name in PARTS:
        ms, steps, ops = out["parts_ms"][name], out["parts_in_steps"][name], out["ops"].get(name, 0)
        print(f"{name:24s} {ms:7.2f} {steps:6.2f} {ops:6d}")
    for name in ("probe_step_rest", "probe_step", "plain_step"):
        print(f"{name:24s} {'':7s} {'':6s} {out['ops'].get(name, 0):6d}")
    for name, top in out["top_ops"].items():
        print(f"  {name}: " + ", ".join(f"{op} {n}" for op, n in top))


if __name__ == "__main__":
    main()

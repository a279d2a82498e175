"""The sweep benchmark (`python -m benchmarks --parts sweep`): how close a local sweep gets to the time
of its runs' own training, how well its workers are balanced, and how long its report takes.

Everything runs the real command line (`python -m diagnose ...` in subprocesses), on the CPU.

- warm: a sweep of small runs (20 steps at width 64) on `workers` warm workers, against the same runs
  each as its own `diagnose run` process, `workers` at a time (what a process per run costs: imports,
  corpus parse and torch's first calls in every run). Figures per side: wall time, the runs' own time
  (the issue's "training steps, probes and validation": their training loop — steps, probe steps and
  in-loop validations, as the trainer times it in metrics.jsonl — plus their final validation, from
  the sweep's timeline), `wall_over_own` = wall × workers / Σ own (1.0: nothing but training; the target
  is ≤ 1.15), `wall_over_loop` the same against the loops alone (the earlier definition, which left the
  final validation out of own), and `fixed_s_per_run` = (wall × workers − Σ own) / runs: what a run
  costs beyond its own work. The `diagnose run` side has no timeline: its own is the loop alone.
- balance: a sweep whose depths span 8× (2 to 16), against the ideal Σ own / workers;
  `wall_over_ideal` ≤ 1.10 is the target. The same measured run times are also put through the greedy
  schedule in grid order and longest first (`simulated_*`), which isolates the ordering from fixed costs.
- CPU time: on a loaded machine wall times inflate with the load; so the same runs are trained again
  one by one in this (warmed-up) process and their CPU time (`run_cpu_s`) set against the CPU time of
  each side's processes together: `cpu_over_run_cpu`, `fixed_cpu_s_per_run`.
- report: `diagnose report` on a sweep of `report_runs` tiny runs: wall and CPU time (target < 15 s).
- timeline: each sweep's sweep_timeline.jsonl split into where wall × workers went beyond the runs' own
  time (`timeline_breakdown`: start, per-run build / tail / handoff, idle at the end, exit).

The last line printed holds exactly the two target ratios: the warm sweep's wall × workers / Σ own
(≤ 1.15) and the balance sweep's wall / (Σ own / workers) (≤ 1.10).

`baseline_code` (a checkout of another version of the toolkit, e.g. main) runs the warm sweep and the
report with that version too, interleaved with ours, for before/after ratios in one process.
Repeats alternate the order of the sides (ABBA), as `benchmarks.timing` does, since the load of a
shared machine drifts.
"""

from __future__ import annotations

import heapq
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diagnose.sweep import TIMELINE_NAME

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SweepBenchConfig:
    """Shapes and sizes of the sweep benchmark (defaults: the issue's targets; ≈ 10 minutes when idle)."""

    workers: int = 2  # local sweep workers (and `diagnose run` processes at a time on the cold side)
    threads: int = 1  # torch threads per worker
    # Runs in the warm sweep (seeds 0..runs-1): the size of the example sweep. The sweep's one
    # start (≈ 2.4 s of torch and torch._dynamo imports that every worker needs) is spread over them;
    # at 16 runs it alone is ≈ 0.1 of the ratio (`--sweep-runs 16`; benchmarks/RESULTS.md, "Sweeps, round 2").
    runs: int = 36
    width: int = 64  # residual width of every run
    depth: int = 4  # depth of the warm sweep's runs
    steps: int = 20  # training steps per run
    balance_depths: tuple[int, ...] = (2, 4, 8, 16)  # depths of the balance sweep (× α = 0.5, 1 × seeds)
    balance_seeds: int = 2  # seeds per (α, depth) in the balance sweep
    report_runs: int = 60  # runs in the report's sweep: α 0.5, 1 × depths 2, 4, 8 × 2 LRs × seeds
    repeats: int = 2  # interleaved repeats of each timed side
    baseline_code: str = ""  # another checkout of the toolkit to time side by side ("" = none)


QUICK_SWEEP = SweepBenchConfig(runs=6, balance_depths=(2, 16), balance_seeds=1, report_runs=12, repeats=1)


def _env(code: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    return env


def diagnose(args: list[str], code: Path = REPO, threads: int = 1) -> tuple[float, float]:
    """Run `python -m diagnose ARGS` with the toolkit at `code`; (wall s, CPU s of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # cwd=code: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
    proc = subprocess.run([sys.executable, "-m", "diagnose", *args], env=_env(code, threads), capture_output=True,
                          text=True, cwd=code)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"diagnose {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def own_seconds(run_dir: Path) -> float:
    """A run's own time: its training loop (steps, probe steps, validations, checkpoints in the loop) as the
    trainer timed it: each metrics line is one step of batch × seq_len tokens at its flush's tokens_per_s."""
    config = json.loads((run_dir / "config.json").read_text())
    tokens = config["train"]["batch_size"] * config["model"]["seq_len"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(tokens / line["tokens_per_s"] for line in lines if "tokens_per_s" in line)


def run_dirs(sweep_dir: Path) -> list[Path]:
    return [sweep_dir / name for name in json.loads((sweep_dir / "sweep.json").read_text())["runs"]]


def _shape(cfg: SweepBenchConfig) -> list[str]:
    return ["--width", str(cfg.width), "--steps", str(cfg.steps), "--device", "cpu"]


def _summary(wall: float, loop: list[float], workers: int, final_val_s: float | None = None) -> dict[str, Any]:
    """Wall against the runs' own time. `loop`: each run's training loop (metrics.jsonl: steps, probe
    steps, in-loop validations); `final_val_s`: the runs' final validations together (from the sweep's
    timeline), which the issue counts as the runs' own work too. own_s = Σ loop + final_val_s (the
    definition of round 2); `wall_over_loop` keeps the earlier one (loop only) beside it. None: no
    timeline (a `diagnose run` per run, an older checkout): own is the loop alone, and says so."""
    own = sum(loop) + (final_val_s or 0.0)
    return {"wall_s": wall, "own_s": own, "loop_s": sum(loop), "final_val_s": final_val_s, "runs": len(loop),
            "wall_over_own": wall * workers / own, "wall_over_loop": wall * workers / sum(loop),
            "fixed_s_per_run": (wall * workers - own) / len(loop)}


def _cold(cfg: SweepBenchConfig, out: Path) -> dict[str, Any]:
    """Each run its own `diagnose run` process, `workers` at a time."""
    def one(seed: int) -> Path:
        run_dir = out / f"s{seed}"
        diagnose(["run", *_shape(cfg), "--depth", str(cfg.depth), "--seed", str(seed), "--no-report", "--quiet",
                  "--out", str(run_dir)], threads=cfg.threads)
        return run_dir

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(cfg.workers) as pool:
        dirs = list(pool.map(one, range(cfg.runs)))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**_summary(wall, [own_seconds(d) for d in dirs], cfg.workers), "cpu_s": cpu}


def _warm(cfg: SweepBenchConfig, out: Path, code: Path) -> dict[str, Any]:
    seeds = ",".join(str(s) for s in range(cfg.runs))
    args = ["sweep", *_shape(cfg), "--depth", str(cfg.depth), "--seed", seeds, "--workers", str(cfg.workers),
            "--threads", str(cfg.threads), "--out", str(out)]
    launched = time.time()
    wall, cpu = diagnose(args, code, cfg.threads)
    parts = timeline_breakdown(out / TIMELINE_NAME, launched, launched + wall)
    final_val = parts["timeline"]["final_val_s"] if parts else None
    return {**_summary(wall, [own_seconds(d) for d in run_dirs(out)], cfg.workers, final_val), "cpu_s": cpu,
            **parts}


def timeline_breakdown(path: Path, launched: float, exited: float) -> dict[str, Any]:
    """Where a sweep's wall time × workers went, from its sweep_timeline.jsonl (`diagnose.sweep.write_timeline`;
    {} when the sweep wrote none, e.g. an older checkout). Seconds, summed over workers unless `per_run`:

    start: from launching the command to each worker's first training loop (interpreter, imports, the
    grid, forking, the first Trainer); per_run (means over runs): build (job received → loop start),
    tail (loop end → run done: final validation, final checkpoint, probe store; `final_val_s`, the
    final validations alone, loop end → validated, summed over runs), handoff (run done →
    the worker's next job received: the result's way back and the next job's way out); idle: workers
    waiting at the end for the last run; exit: the last run collected → the command's exit, per worker.
    With own = Σ loop_end − loop_start (what metrics.jsonl times), wall × workers = own + start +
    runs × (build + tail + handoff) + idle + exit, up to the workers' start offsets (`unaccounted`)."""
    if not path.is_file():
        return {}
    events = [json.loads(line) for line in path.read_text().splitlines()]
    t0 = next(e["unix"] for e in events if e["event"] == "sweep_start")
    runs: dict[str, dict[str, Any]] = {}
    for e in events:
        if "run" in e:
            runs.setdefault(e["run"], {})[e["event"]] = e["t"] + t0
            if e["event"] == "sent":
                runs[e["run"]]["worker"] = e["worker"]
    for name, r in runs.items():
        r["name"] = name
    done = [r for r in runs.values() if {"loop_start", "validated", "closed", "collected"} <= set(r)]
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(done, key=lambda r: r["received"]):
        by_worker.setdefault(r["worker"], []).append(r)
    last = max(r["collected"] for r in done)
    start = sum(rs[0]["loop_start"] - launched for rs in by_worker.values())
    build = sum(r["loop_start"] - r["received"] for r in done) - sum(rs[0]["loop_start"] - rs[0]["received"]
                                                                    for rs in by_worker.values())
    tail = sum(r["closed"] - r["loop_end"] for r in done)
    final_val = sum(r["validated"] - r["loop_end"] for r in done)
    handoff = sum(b["received"] - a["closed"] for rs in by_worker.values() for a, b in zip(rs, rs[1:]))
    handoff += sum(rs[-1]["collected"] - rs[-1]["closed"] for rs in by_worker.values())
    idle = sum(last - rs[-1]["collected"] for rs in by_worker.values())
    own = sum(r["loop_end"] - r["loop_start"] for r in done)
    n, workers = len(done), len(by_worker)
    accounted = own + start + build + tail + handoff + idle + (exited - last) * workers
    return {"timeline": {"start_s": start, "build_s_per_run": build / n, "tail_s_per_run": tail / n,
                         "handoff_s_per_run": handoff / n, "final_val_s": final_val,
                         "idle_s": idle, "exit_s": (exited - last) * workers,
                         "own_s": own, "unaccounted_s": (exited - launched) * workers - accounted,
                         "final_val_by_run": {r["name"]: r["validated"] - r["loop_end"] for r in done}}}


def run_cpu_seconds(run_dirs_: list[Path], out: Path, threads: int) -> list[float]:
    """CPU time of each run trained again in this (warmed-up) process: its work, whatever the machine's
    load, plus the small per-run part of a warm worker (building the trainer, the last validation and
    checkpoint). With one thread, wall-clock figures on a loaded machine inflate; these do not."""
    import torch

    from diagnose.sweep import run_one

    torch.set_num_threads(threads)
    configs = [json.loads((d / "config.json").read_text()) for d in run_dirs_]
    run_one(configs[0], configs[0]["probes"], str(out / "warm-up"), False, threads)  # imports, first calls
    seconds = []
    for i, config in enumerate(configs):
        c0 = time.process_time()
        run_one(config, config["probes"], str(out / f"run-{i}"), False, threads)
        seconds.append(time.process_time() - c0)
    return seconds


def makespan(seconds: list[float], workers: int) -> float:
    """Finish time of jobs of these durations handed out in this order to the first free of `workers`."""
    free = [0.0] * workers
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def _balance(cfg: SweepBenchConfig, out: Path, code: Path = REPO) -> dict[str, Any]:
    depths = ",".join(str(d) for d in cfg.balance_depths)
    seeds = ",".join(str(s) for s in range(cfg.balance_seeds))
    args = ["sweep", *_shape(cfg), "--param", "alpha", "--alpha", "0.5,1", "--depth", depths, "--seed", seeds,
            "--workers", str(cfg.workers), "--threads", str(cfg.threads), "--out", str(out)]
    launched = time.time()
    wall, _ = diagnose(args, code, threads=cfg.threads)
    parts = timeline_breakdown(out / TIMELINE_NAME, launched, launched + wall)
    # Each run's own time, in grid order (depth ascending within α): its loop plus its final validation.
    loop = {d.name: own_seconds(d) for d in run_dirs(out)}
    final_val = parts["timeline"]["final_val_by_run"] if parts else {}
    grid = [loop[name] + final_val.get(name, 0.0) for name in loop]
    ideal, ideal_loop = sum(grid) / cfg.workers, sum(loop.values()) / cfg.workers
    return {"wall_s": wall, "own_s": sum(grid), "loop_s": sum(loop.values()), "runs": len(grid), "ideal_s": ideal,
            "wall_over_ideal": wall / ideal, "wall_over_ideal_loop": wall / ideal_loop,
            "depths": list(cfg.balance_depths),
            "simulated_grid_order_over_ideal": makespan(grid, cfg.workers) / ideal,
            "simulated_longest_first_over_ideal": makespan(sorted(grid, reverse=True), cfg.workers) / ideal,
            **parts}


def _report_sweep(cfg: SweepBenchConfig, out: Path) -> None:
    seeds = ",".join(str(s) for s in range(max(1, cfg.report_runs // 12)))
    args = ["sweep", "--width", str(cfg.width), "--param", "alpha", "--alpha", "0.5,1", "--depth", "2,4,8", "--lr",
            "0.001,0.004", "--seed", seeds, "--steps", "10", "--seq-len", "64", "--batch-size", "8",
            "--probe-every", "5", "--eval-every", "5", "--device", "cpu", "--workers", str(cfg.workers),
            "--threads", str(cfg.threads), "--out", str(out)]
    diagnose(args, threads=cfg.threads)


def run_sweep_bench(cfg: SweepBenchConfig) -> dict[str, Any]:
    """Every figure of the sweep benchmark (see the module docstring), as a JSON-ready dict."""
    baseline = Path(cfg.baseline_code).resolve() if cfg.baseline_code else None
    result: dict[str, Any] = {"config": asdict(cfg), "load_avg_start": os.getloadavg(), "cpu_cores": os.cpu_count(),
                              "gpu": "not measured"}
    sides = {"warm": lambda out: _warm(cfg, out, REPO), "cold": lambda out: _cold(cfg, out)}
    if baseline is not None:
        sides["baseline_sweep"] = lambda out: _warm(cfg, out, baseline)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp_path = Path(tmp)
        per_side: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for r in range(cfg.repeats):
            for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                out = tmp_path / f"{name}-{r}"
                per_side[name].append(sides[name](out))
                if name != "warm":
                    shutil.rmtree(out)
        for name, rows in per_side.items():
            result[name] = min(rows, key=lambda row: row["wall_over_own"])  # the least disturbed repeat
            result[name]["repeats"] = [row["wall_over_own"] for row in rows]
        # CPU time: the sweep's processes together against the runs' own CPU time in a warm process.
        own_cpu = run_cpu_seconds(run_dirs(tmp_path / "warm-0"), tmp_path / "own-cpu", cfg.threads)
        result["run_cpu_s"] = sum(own_cpu)
        for name in per_side:
            r = result[name]
            r["cpu_over_run_cpu"] = r["cpu_s"] / sum(own_cpu)
            r["fixed_cpu_s_per_run"] = (r["cpu_s"] - sum(own_cpu)) / r["runs"]
        result["balance"] = _balance(cfg, tmp_path / "balance")
        report_dir = tmp_path / "report-sweep"
        _report_sweep(cfg, report_dir)
        codes = {"ours": REPO, **({"baseline": baseline} if baseline is not None else {})}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in codes}
        for r in range(cfg.repeats):
            for name in (list(codes) if r % 2 == 0 else list(reversed(codes))):
                times[name].append(diagnose(["report", str(report_dir), "--out", str(tmp_path / f"rep-{name}")],
                                            codes[name]))
        result["report"] = {"runs": len(run_dirs(report_dir)),
                            **{f"{name}_{k}": min(t[i] for t in ts) for name, ts in times.items()
                               for i, k in enumerate(("wall_s", "cpu_s"))}}
    result["load_avg_end"] = os.getloadavg()
    return result


def format_sweep(result: dict[str, Any]) -> list[str]:
    """Table lines for `run_sweep_bench`'s result."""
    cfg = result["config"]
    lines = [f"  sweep ({cfg['workers']} workers × {cfg['threads']} thread; load average "
             f"{result['load_avg_start'][0]:.1f} → {result['load_avg_end'][0]:.1f} on {result['cpu_cores']} cores)"]
    for name in ("warm", "baseline_sweep", "cold"):
        if name in result:
            r = result[name]
            lines.append(f"    {name:<15} {r['runs']} runs: wall {r['wall_s']:.1f} s, own {r['own_s']:.1f} s, "
                         f"wall × workers / own {r['wall_over_own']:.3f} (/ loop only "
                         f"{r['wall_over_loop']:.3f}), fixed {r['fixed_s_per_run']:.2f} s/run; "
                         f"CPU {r['cpu_s']:.1f} s / runs' CPU {result['run_cpu_s']:.1f} s = "
                         f"{r['cpu_over_run_cpu']:.3f}, fixed {r['fixed_cpu_s_per_run']:.2f} CPU s/run")
        if name in result and "timeline" in result[name]:
            lines.append("      " + format_breakdown(result[name]["timeline"], result[name]["runs"]))
    b = result["balance"]
    lines.append(f"    balance (depths {b['depths']}): wall / (own / workers) {b['wall_over_ideal']:.3f} (/ loop "
                 f"only {b['wall_over_ideal_loop']:.3f}); "
                 f"simulated: grid order {b['simulated_grid_order_over_ideal']:.3f}, "
                 f"longest first {b['simulated_longest_first_over_ideal']:.3f}")
    if "timeline" in b:
        lines.append("      " + format_breakdown(b["timeline"], b["runs"]))
    rep = result["report"]
    lines.append(f"    report of {rep['runs']} runs: wall {rep['ours_wall_s']:.1f} s, cpu {rep['ours_cpu_s']:.1f} s"
                 + (f"; baseline wall {rep['baseline_wall_s']:.1f} s, cpu {rep['baseline_cpu_s']:.1f} s"
                    if "baseline_wall_s" in rep else ""))
    lines.append(f"  TARGETS: warm sweep wall × workers / Σ own = {result['warm']['wall_over_own']:.3f} (≤ 1.15); "
                 f"balance wall / (Σ own / workers) = {b['wall_over_ideal']:.3f} (≤ 1.10); own without the final "
                 f"validation: {result['warm']['wall_over_loop']:.3f}, {b['wall_over_ideal_loop']:.3f}")
    return lines


def format_breakdown(t: dict[str, float], runs: int) -> str:
    """One line: the wall × workers of a sweep beyond its runs' own time, by where it went."""
    per_run = t["build_s_per_run"] + t["tail_s_per_run"] + t["handoff_s_per_run"]
    return (f"beyond the loops' {t['own_s']:.1f} s (worker-seconds): start {t['start_s']:.1f}, per run "
            f"{per_run:.3f} × {runs} (build {t['build_s_per_run']:.3f}, tail {t['tail_s_per_run']:.3f} of which "
            f"final validation {t['final_val_s'] / runs:.3f}, handoff "
            f"{t['handoff_s_per_run']:.3f}), idle at the end {t['idle_s']:.1f}, exit {t['exit_s']:.1f}, "
            f"unaccounted {t['unaccounted_s']:.2f}")

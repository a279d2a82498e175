"""`diagnose sweep`: a grid of independent runs in one sweep dir, on a local pool or a Slurm cluster.

Re-running the same command is safe: finished runs (and runs that diverged) are skipped, interrupted
ones continue from their last checkpoint, and the rest start. Slurm submission goes through
submitit (a job array); `--executor debug` runs the same submitit path in-process, for tests.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import click

from diagnose.options import build_spec, probe_options, run_name, sweep_axis_options

EXECUTORS = ("local", "slurm", "debug")
SWEEP_NAME = "sweep.json"


def _split(text: str, kind: type) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def expand_grid(opts: dict) -> list[dict]:
    """One option dict per grid point. `--param sp,mup,alpha --alpha 0.5,1` gives sp, mup, α=.5, α=1."""
    from trainer.parameterization import resolve_name

    params = []
    alphas = _split(opts["alpha"], float) if opts["alpha"] is not None else [None]
    for p in _split(opts["param"], str):
        resolve_name(p, None)  # validates the name
        if p.lower() == "alpha":
            params += [("alpha", a if a is not None else 1.0) for a in alphas]
        else:
            params.append((p, None))
    axes = {
        "param": params,
        "depth": _split(opts["depth"], int),
        "width": _split(opts["width"], int),
        "lr": _split(opts["lr"], float),
        "seed": _split(opts["seed"], int),
    }
    grid = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values))
        (param, alpha) = point.pop("param")
        grid.append({**opts, **point, "param": param, "alpha": alpha})
    return grid


def run_state(run_dir: Path) -> str:
    """new | finished | diverged | interrupted, from what the run dir holds."""
    status_file = run_dir / "status.json"
    if not status_file.is_file():
        return "new"
    status = json.loads(status_file.read_text())
    if status["state"] == "finished":
        return "finished"
    if status["state"] == "failed" and "non-finite" in status.get("message", ""):
        return "diverged"
    return "interrupted" if (run_dir / "checkpoint.pt").is_file() else "new"


def run_one(spec_dict: dict, probe_dict: dict | None, out: str, resume: bool, threads: int) -> tuple[str, str]:
    """Worker entry point (a fresh process, or a Slurm job): train one run, return (dir, outcome)."""
    import torch

    from diagnose.cli import execute_run
    from probes.recorder import ProbeConfig
    from trainer.loop import NonFiniteLoss, RunSpec

    torch.set_num_threads(threads)
    spec = RunSpec.from_dict(spec_dict)
    probes = ProbeConfig(**probe_dict) if probe_dict else None
    try:
        execute_run(spec, probes, Path(out), resume=resume, quiet=True)
    except NonFiniteLoss as err:
        return out, f"diverged ({err})"
    return out, "finished"


@click.command()
@sweep_axis_options
@probe_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Sweep dir.")
@click.option("--workers", type=int, default=1, show_default=True, help="Local worker processes.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="local process pool, slurm (submitit job array) or debug (submitit, in-process).")
@click.option("--slurm-partition", default=None, help="Slurm partition.")
@click.option("--slurm-time", type=int, default=60, show_default=True, help="Minutes per run.")
@click.option("--slurm-gpus", type=int, default=0, show_default=True, help="GPUs per run.")
@click.option("--slurm-cpus", type=int, default=2, show_default=True, help="CPUs per run.")
@click.option("--slurm-parallel", type=int, default=64, show_default=True, help="Max concurrent array tasks.")
def sweep(out: Path, workers: int, executor: str, slurm_partition: str | None, slurm_time: int, slurm_gpus: int,
          slurm_cpus: int, slurm_parallel: int, **opts) -> None:
    """Train a grid of runs. --param, --alpha, --depth, --width, --lr and --seed take comma lists."""
    from tqdm import tqdm

    from trainer.errors import ConfigError

    if workers <= 0:
        raise click.ClickException(f"--workers={workers} must be a positive integer")
    if executor != "slurm" and slurm_partition is not None:
        raise click.ClickException(f"--slurm-partition {slurm_partition!r} only applies to --executor slurm")
    try:
        grid = expand_grid(opts)
        if len(grid) < 2:
            raise ConfigError("the sweep has nothing to vary: give at least one comma list "
                              "(--param, --alpha, --depth, --width, --lr or --seed)")
        jobs = []
        for point in grid:
            spec, probes = build_spec(point)
            jobs.append((spec, probes, out / run_name(spec)))
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_NAME).write_text(json.dumps({"runs": [str(j[2].name) for j in jobs],
                                              "options": {k: v for k, v in opts.items()}}, indent=2, default=str))
    todo = []
    for spec, probes, run_dir in jobs:
        state = run_state(run_dir)
        if state in ("finished", "diverged"):
            continue
        if state == "new" and run_dir.exists():
            shutil.rmtree(run_dir)  # started but never checkpointed: start over
        todo.append((spec.to_dict(), probes.to_dict() if probes else None, str(run_dir), state == "interrupted"))
    click.echo(f"sweep {out}: {len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    if executor == "local":
        outcomes = _run_local(todo, workers, tqdm)
    else:
        outcomes = _run_submitit(todo, out, executor, slurm_partition, slurm_time, slurm_gpus, slurm_cpus,
                                 slurm_parallel)
    diverged = [o for o in outcomes if o[1] != "finished"]
    for run_dir, outcome in diverged:
        click.echo(f"  {Path(run_dir).name}: {outcome}")
    click.echo(f"sweep dir: {out}  ({len(outcomes) - len(diverged)} finished, {len(diverged)} diverged)")


def _run_local(todo: list[tuple], workers: int, tqdm) -> list[tuple[str, str]]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        return [run_one(*job, threads) for job in tqdm(todo, desc="runs", unit="run")]
    outcomes = []
    # spawn: a fresh interpreter per worker, no forked torch state.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, *job, threads) for job in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs", unit="run"):
            outcomes.append(future.result())
    return outcomes


def _run_submitit(todo, out: Path, executor: str, partition, minutes, gpus, cpus, parallel):
    try:
        import submitit
    except ImportError:
        raise click.ClickException("--executor slurm needs submitit: pip install 'completep-diagnostics[slurm]'") \
            from None
    ex = submitit.AutoExecutor(folder=out / "submitit", cluster="debug" if executor == "debug" else "slurm")
    params = {"timeout_min": minutes, "cpus_per_task": cpus}
    if executor == "slurm":
        params.update(slurm_array_parallelism=parallel, gpus_per_node=gpus)
        if partition:
            params["slurm_partition"] = partition
    ex.update_parameters(**params)
    columns = list(zip(*[(*job, cpus) for job in todo]))
    jobs = ex.map_array(run_one, *columns)
    click.echo(f"submitted {len(jobs)} runs ({executor}); waiting for them")
    return [job.result() for job in jobs]



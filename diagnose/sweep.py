"""`diagnose sweep`: a grid of independent runs in one sweep dir, on a local pool or a Slurm cluster.

Re-running the same command is safe: finished runs (and runs that diverged) are skipped, interrupted
ones continue from their last checkpoint, and the rest start. Slurm submission goes through
submitit (one job array, one array task per run); `--executor debug` runs the same submitit path
in-process, for tests. With `--slurm-gpus N > 1` each run is a data-parallel job of N tasks (one per
GPU) that joins a torch.distributed process group, as under torchrun.

Locally, runs go to warm worker processes (`diagnose.workers`) that import once and run one run after
another, longest first by an estimate of their cost, so that the deepest runs do not finish alone
at the end; by default workers × threads per worker fill the CPU cores. `--report` writes the
sweep's report (`diagnose report`) when the runs are done.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import click

from diagnose.options import build_spec, probe_options, run_name, sweep_axis_options

EXECUTORS = ("local", "slurm", "debug")
SWEEP_NAME = "sweep.json"
TIMELINE_NAME = "sweep_timeline.jsonl"  # where a local sweep's time went (write_timeline)
# --slurm-* option -> the submitit Slurm parameter it sets (for --slurm-opt clashes and error messages).
SLURM_OPTIONS = {"slurm_partition": "partition", "slurm_time": "time", "slurm_gpus": "gpus_per_node",
                 "slurm_cpus": "cpus_per_task", "slurm_mem": "mem", "slurm_parallel": "array_parallelism",
                 "slurm_opt": None}


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


def run_one(spec_dict: dict, probe_dict: dict | None, out: str, resume: bool, threads: int,
            tasks: int = 1) -> tuple[str, str]:
    """Worker entry point (a fresh process, or a Slurm job): train one run, return (dir, outcome).

    `tasks` > 1: this is one of the run's data-parallel Slurm tasks (one per GPU); it joins the
    run's process group through submitit's job environment and only task 0 writes.
    """
    out, outcome, _ = run_timed(spec_dict, probe_dict, out, resume, threads, tasks)
    return out, outcome


def run_timed(spec_dict: dict, probe_dict: dict | None, out: str, resume: bool, threads: int,
              tasks: int = 1) -> tuple[str, str, dict[str, float]]:
    """`run_one`, plus the run's phase times (`Trainer.timeline`; empty if it diverged): what a local
    sweep's warm workers execute."""
    import torch

    from diagnose.cli import execute_run
    from probes.recorder import ProbeConfig
    from trainer.loop import NonFiniteLoss, RunSpec, distributed

    torch.set_num_threads(threads)
    if tasks > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    spec = RunSpec.from_dict(spec_dict)
    probes = ProbeConfig(**probe_dict) if probe_dict else None
    try:
        with distributed("auto", spec.train.device):
            result = execute_run(spec, probes, Path(out), resume=resume, quiet=True)
    except NonFiniteLoss as err:
        return out, f"diverged ({err})", {}
    return out, "finished", result["timeline"]


def preload_for_runs(specs: list[dict]) -> None:
    """What every run of a local sweep needs, loaded once in the sweep process before its workers are
    forked from it: the toolkit's modules and the libraries they import on first use (torch.func,
    xarray, zarr), and the embedded corpus, parsed (~2.5 s in all, which each worker would otherwise
    pay). Imports and file reads only: no torch operation runs here (see diagnose.workers, fork safety)."""
    import torch._dynamo  # noqa: F401 - torch.optim's first optimizer imports it (with sympy): ~1.5 s
    import torch.func  # noqa: F401 - the linearization's first call imports it
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import diagnose.cli  # noqa: F401
    import probes.linearized_model  # noqa: F401
    import probes.recorder  # noqa: F401
    from trainer.data import BUILTIN, builtin_tokens

    if any(spec["data"]["source"] == BUILTIN for spec in specs):
        builtin_tokens()


def _parse_slurm_opts(pairs: tuple[str, ...]) -> dict[str, object]:
    """`--slurm-opt KEY=VALUE` pairs as submitit Slurm parameters; ClickException on a bad one."""
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.ClickException(f"--slurm-opt {pair!r} must look like KEY=VALUE (e.g. account=myproj)")
        dedicated = [f"--{o.replace('_', '-')}" for o, k in SLURM_OPTIONS.items() if k == key]
        if dedicated:
            raise click.ClickException(f"--slurm-opt {key}=...: use {dedicated[0]} instead")
        params[key] = int(value) if value.strip().isdigit() else value
    return params


def check_slurm(params: dict[str, object], check_tools: bool = True) -> None:
    """Refuse, in one line, what would fail at submission: no submitit, no sbatch, an unknown option."""
    try:
        import submitit
    except ImportError:
        raise click.ClickException("--executor slurm needs submitit: pip install 'completep-diagnostics[slurm]'") \
            from None
    known = submitit.SlurmExecutor._valid_parameters()
    for key in params:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
            raise click.ClickException(f"--slurm-opt {key}=...: {key!r} is not a Slurm option submitit knows{hint}")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if check_tools and missing:
        raise click.ClickException(f"--executor slurm: Slurm's {' and '.join(repr(t) for t in missing)} "
                                   f"{'is' if len(missing) == 1 else 'are'} not on PATH on this machine; run the "
                                   "sweep from a cluster login node, or use --executor local")


@click.command()
@sweep_axis_options
@probe_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Sweep dir.")
@click.option("--workers", type=int, default=None,
              help="Local worker processes [default: CPU cores // threads, at most one per run] (--executor local).")
@click.option("--threads", type=int, default=None,
              help="Torch threads per local worker [default: $OMP_NUM_THREADS, else CPU cores // workers]. "
                   "One per worker is fastest for tiny models on a busy machine.")
@click.option("--report/--no-report", "make_report", default=False, show_default=True,
              help="Write the sweep's report (figures, summary.md) into <out>/report when the runs are done.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="local process pool, slurm (submitit job array) or debug (submitit, in-process).")
@click.option("--slurm-partition", default=None, help="Slurm partition (--executor slurm).")
@click.option("--slurm-time", type=int, default=60, show_default=True, help="Minutes per run (--executor slurm).")
@click.option("--slurm-gpus", type=int, default=0, show_default=True,
              help="GPUs per run; more than 1 trains each run data-parallel over them (--executor slurm).")
@click.option("--slurm-cpus", type=int, default=2, show_default=True, help="CPUs per task (--executor slurm).")
@click.option("--slurm-mem", type=float, default=None, help="Memory per run in GB (--executor slurm).")
@click.option("--slurm-parallel", type=int, default=64, show_default=True,
              help="Max concurrent array tasks (--executor slurm).")
@click.option("--slurm-opt", multiple=True, metavar="KEY=VALUE",
              help="Any other submitit Slurm parameter, e.g. account=myproj, qos=high, constraint=a100 "
                   "(repeatable; --executor slurm).")
@click.pass_context
def sweep(ctx: click.Context, out: Path, workers: int | None, threads: int | None, make_report: bool, executor: str,
          slurm_partition: str | None, slurm_time: int, slurm_gpus: int, slurm_cpus: int,
          slurm_mem: float | None, slurm_parallel: int, slurm_opt: tuple[str, ...], **opts) -> None:
    """Train a grid of runs. --param, --alpha, --depth, --width, --lr and --seed take comma lists.

    Locally, warm worker processes run the runs longest first; on Slurm each run is an array task.
    """
    started = time.time()
    from tqdm import tqdm

    from trainer.errors import ConfigError
    from trainer.loop import env_rank_world, validate_train

    if env_rank_world()[1] > 1:
        raise click.ClickException("diagnose sweep starts its own processes; launch it without torchrun "
                                   "(for data-parallel runs on Slurm use --slurm-gpus N)")
    given = [name for name in SLURM_OPTIONS
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if executor != "slurm" and given:
        names = ", ".join(f"--{n.replace('_', '-')}" for n in given)
        raise click.ClickException(f"{names} only appl{'ies' if len(given) == 1 else 'y'} to --executor slurm, "
                                   f"not --executor {executor}")
    for name in ("workers", "threads"):
        if executor != "local" and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.ClickException(f"--{name} only applies to --executor local, not --executor {executor}")
    if threads is not None and threads <= 0:
        raise click.ClickException(f"--threads={threads} must be a positive integer")
    for name, value in (("workers", workers), ("slurm-time", slurm_time), ("slurm-cpus", slurm_cpus),
                        ("slurm-parallel", slurm_parallel)):
        if value is not None and value <= 0:
            raise click.ClickException(f"--{name}={value} must be a positive integer")
    if slurm_gpus < 0:
        raise click.ClickException(f"--slurm-gpus={slurm_gpus} must be 0 or more")
    if slurm_mem is not None and slurm_mem <= 0:
        raise click.ClickException(f"--slurm-mem={slurm_mem:g} must be positive (GB)")
    slurm_params: dict[str, object] = {}
    if executor == "slurm":
        slurm_params = _parse_slurm_opts(slurm_opt)
        check_slurm(slurm_params)
    tasks = slurm_gpus if executor == "slurm" and slurm_gpus > 1 else 1
    try:
        grid = expand_grid(opts)
        if len(grid) < 2:
            raise ConfigError("the sweep has nothing to vary: give at least one comma list "
                              "(--param, --alpha, --depth, --width, --lr or --seed)")
        jobs = []
        for point in grid:
            spec, probes = build_spec(point)
            if tasks > 1:
                validate_train(spec.train, tasks)
            jobs.append((spec, probes, out / run_name(spec)))
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    if make_report and all(probes is None for _, probes, _ in jobs):
        raise click.ClickException("--report needs probe records, but the sweep runs with --no-probes")
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
    todo = schedule(todo)
    click.echo(f"sweep {out}: {len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        _report(ctx, out, make_report)
        return
    if executor == "local":
        workers, threads = pool_shape(len(todo), workers, threads)
        click.echo(f"{workers} worker process{'es' if workers > 1 else ''}, "
                   f"{threads} thread{'s' if threads > 1 else ''} each"
                   + (f" (more than the {cpu_cores()} CPU cores: they will contend)"
                      if workers * threads > cpu_cores() else ""))
        outcomes = _run_local(todo, workers, threads, tqdm, out, started)
    else:
        jobs_ = submit(todo, out, executor, slurm_partition, slurm_time, slurm_gpus, slurm_cpus, slurm_mem,
                       slurm_parallel, slurm_params)
        click.echo(f"submitted {len(jobs_)} runs ({executor}"
                   + (f", job array {jobs_[0].job_id.split('_')[0]}" if executor == "slurm" else "")
                   + f"; logs in {out / 'submitit'}); waiting for them")
        outcomes = wait(jobs_, todo)
    unfinished = [o for o in outcomes if o[1] != "finished"]
    for run_dir, outcome in unfinished:
        click.echo(f"  {Path(run_dir).name}: {outcome}")
    failed = [o for o in unfinished if o[1].startswith("failed")]
    click.echo(f"sweep dir: {out}  ({len(outcomes) - len(unfinished)} finished, "
               f"{len(unfinished) - len(failed)} diverged" + (f", {len(failed)} failed" if failed else "") + ")")
    _report(ctx, out, make_report)
    if failed:
        raise click.exceptions.Exit(1)


def _report(ctx: click.Context, out: Path, make_report: bool) -> None:
    """`diagnose report` on the sweep dir, when asked (after every run, whatever their outcomes)."""
    if not make_report:
        return
    from diagnose.commands_analysis import report

    ctx.invoke(report, dirs=(out,), out=out / "report")


def run_cost(spec_dict: dict) -> float:
    """Estimated training FLOPs of a run (model FLOPs per token × tokens), to schedule the longest first."""
    from trainer.loop import RunSpec
    from trainer.model import flops_per_token

    spec = RunSpec.from_dict(spec_dict)
    tokens = spec.train.steps * spec.train.batch_size * spec.model.seq_len
    return flops_per_token(spec.param, spec.model.seq_len) * tokens


def schedule(todo: list[tuple]) -> list[tuple]:
    """`todo` longest first by `run_cost` (ties keep the grid order): the greedy order that lets
    the short runs fill in around the long ones, so no worker idles while the deepest run finishes."""
    return sorted(todo, key=lambda job: -run_cost(job[0]))


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, as a job scheduler sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pool_shape(runs: int, workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per worker) for a local sweep of `runs` runs: unless given, workers × threads
    fill the cores, with $OMP_NUM_THREADS (else one) threads per worker and at most one worker per run."""
    cores = cpu_cores()
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    if workers is None:
        workers = max(1, min(runs, cores // (threads or 1)))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def _run_local(todo: list[tuple], workers: int, threads: int, tqdm, out: Path,
               started: float) -> list[tuple[str, str]]:
    """Run `todo` in order on a pool of warm workers; a run that raised or whose worker died is 'failed (...)'.
    Writes where the time went into <out>/sweep_timeline.jsonl (`write_timeline`)."""
    from diagnose.workers import JobFailed, WarmPool

    outcomes, phases = [], {}
    pool = WarmPool(run_timed, workers, preload=lambda: preload_for_runs([job[0] for job in todo]))
    pool.start(len(todo))  # before the progress bar's monitor thread exists (fork safety)
    try:
        with tqdm(total=len(todo), desc="runs", unit="run") as bar:
            for index, result in pool.run([(*job, threads) for job in todo]):
                if isinstance(result, JobFailed):
                    result = (todo[index][2], f"failed ({result.message})", {})
                outcomes.append(tuple(result[:2]))
                phases[index] = result[2]
                bar.update()
    finally:
        write_timeline(out / TIMELINE_NAME, started, pool.timeline, phases, [job[2] for job in todo])
    return outcomes


def write_timeline(path: Path, started: float, pool_events: list[dict], phases: dict[int, dict[str, float]],
                   run_dirs: list[str]) -> None:
    """Append one sweep's timeline to `path`, one JSON object per line, times in s since the sweep
    command started (`started`, time.time()): the pool's events (workers preloaded and started, each
    job sent, received by its worker, returned and collected) and each run's phases from
    `Trainer.timeline` (built, loop_start, loop_end, validated, saved, closed), with the run's name.
    The sweep's own time per run is loop_end - loop_start; everything else is fixed cost."""
    lines = [{"event": "sweep_start", "t": 0.0, "unix": started}]
    for event in pool_events:
        name = {"run": Path(run_dirs[event["job"]]).name} if "job" in event else {}
        lines.append({**event, **name, "t": event["t"] - started})
    worker_of = {e["job"]: e["worker"] for e in pool_events if e["event"] == "sent"}
    for job, times in sorted(phases.items()):
        for phase, t in times.items():
            lines.append({"event": phase, "t": t - started, "worker": worker_of.get(job), "job": job,
                          "run": Path(run_dirs[job]).name})
    lines.append({"event": "sweep_end", "t": time.time() - started})
    lines.sort(key=lambda line: line["t"])
    with open(path, "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))


def submit(todo: list[tuple], out: Path, executor: str, partition: str | None, minutes: int, gpus: int,
           cpus: int, mem_gb: float | None, parallel: int, extra: dict[str, object] | None = None) -> list:
    """Submit `todo` through submitit as one job array (slurm) or in-process jobs (debug); returns the jobs."""
    import submitit

    ex = submitit.AutoExecutor(folder=out / "submitit", cluster="debug" if executor == "debug" else "slurm")
    tasks = gpus if executor == "slurm" and gpus > 1 else 1
    params: dict[str, object] = {"timeout_min": minutes, "cpus_per_task": cpus, "name": f"diagnose-{out.name}"}
    if executor == "slurm":
        params.update(slurm_array_parallelism=parallel, gpus_per_node=gpus, tasks_per_node=tasks, nodes=1)
        if mem_gb is not None:
            params["mem_gb"] = mem_gb
        if partition:
            params["slurm_partition"] = partition
        params.update({f"slurm_{k}": v for k, v in (extra or {}).items()})
    try:
        ex.update_parameters(**params)
    except (ValueError, NameError, AssertionError, TypeError) as err:  # submitit's checks of the values
        raise click.ClickException(f"submitit refused the Slurm options: {str(err).splitlines()[0]}") from None
    columns = [list(c) for c in zip(*[(*job, cpus, tasks) for job in todo])]
    try:
        return ex.map_array(run_one, *columns)
    except (OSError, subprocess.CalledProcessError, submitit.core.utils.FailedSubmissionError) as err:
        raise click.ClickException(f"Slurm submission failed: {str(err).strip().splitlines()[0]}") from None


def wait(jobs: list, todo: list[tuple]) -> list[tuple[str, str]]:
    """Each job's (run dir, outcome); a job that crashed is 'failed (...)', not an exception."""
    outcomes = []
    for job, entry in zip(jobs, todo):
        try:
            outcomes.append(tuple(job.results()[0]))  # task 0 of a data-parallel run speaks for it
        except Exception as err:  # noqa: BLE001 - one crashed run must not lose the others' outcomes
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            outcomes.append((entry[2], f"failed ({first}; log: {job.paths.stderr})"))
    return outcomes

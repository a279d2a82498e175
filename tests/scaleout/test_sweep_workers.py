"""Local sweeps on warm workers: a run in a warm worker is bit for bit the run of a fresh process; a
killed worker fails only its run and the sweep goes on; a re-run resumes that run; runs go longest first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from diagnose.cli import main
from diagnose.sweep import cpu_cores, pool_shape, run_cost, schedule
from diagnose.workers import JobFailed, WarmPool, fork_is_safe
from tests.scaleout._pool_jobs import fail_on_odd
from tests.scaleout.conftest import env

TINY = ["--width", "64", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3",
        "--log-every", "3", "--probe-every", "2", "--probe-batch", "2", "--device", "cpu"]


def _train_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_second_run_of_a_warm_worker_is_bitwise_a_fresh_process_run(tmp_path):
    out = tmp_path / "sw"
    # Longest first: the depth-3 run warms the worker, then the depth-2 run is its second run. The real
    # command in its own process: its worker is forked from it (a test process runs threads: spawn).
    result = subprocess.run([sys.executable, "-m", "diagnose", "sweep", *TINY, "--steps", "6", "--depth", "3,2",
                             "--workers", "1", "--threads", "1", "--report", "--out", str(out)], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "(2 finished, 0 diverged)" in result.stdout, result.stdout + result.stderr
    # --report: the sweep's report, as `diagnose report` writes it, without a second command.
    assert f"2 run(s); report in {out / 'report'}" in result.stdout, result.stdout
    assert "## Runs" in (out / "report" / "summary.md").read_text()
    assert len(json.loads((out / "report" / "summary.json").read_text())["runs"]) == 2
    deep, warm = (next(out.glob(f"*_d{d}_*")) for d in (3, 2))
    assert (deep / "status.json").stat().st_mtime <= (warm / "config.json").stat().st_mtime  # ran second
    # The timeline: one worker ran both; each run's loop (loop_start..loop_end) is the time metrics.jsonl
    # gives it (the same timer, read a few µs apart), and its phases come in order.
    timeline = [json.loads(line) for line in (out / "sweep_timeline.jsonl").read_text().splitlines()]
    for run_dir in (deep, warm):
        phases = {e["event"]: e["t"] for e in timeline if e.get("run") == run_dir.name}
        order = ["sent", "received", "built", "loop_start", "loop_end", "validated", "saved", "closed", "collected"]
        assert [phases[p] for p in order] == sorted(phases[p] for p in order), phases
        lines = _train_lines(run_dir)
        own = sum(4 * 16 / line["tokens_per_s"] for line in lines if "tokens_per_s" in line)
        assert phases["loop_end"] - phases["loop_start"] == pytest.approx(own, abs=0.02)
    assert len({e["worker"] for e in timeline if e["event"] == "loop_start"}) == 1
    assert [e["event"] for e in timeline].count("preloaded") == 1  # forked from the preloaded sweep process
    fresh = tmp_path / "fresh"
    proc = subprocess.run([sys.executable, "-m", "diagnose", "run", *TINY, "--steps", "6", "--depth", "2",
                           "--no-report", "--quiet", "--out", str(fresh)], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def numbers(lines: list[dict]) -> list[dict]:  # everything but the timing
        return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]

    assert numbers(_train_lines(warm)) == numbers(_train_lines(fresh))
    a, b = (xr.open_zarr(d / "probes.zarr").load() for d in (warm, fresh))
    assert set(a.data_vars) == set(b.data_vars) and a.sizes["step"] == b.sizes["step"] > 3
    for name in a.data_vars:
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name


def _worker_pid(parent: int) -> int | None:
    """The pid of `parent`'s worker (forked, or spawned; not multiprocessing's resource tracker), if running."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_a_killed_worker_fails_its_run_the_sweep_goes_on_and_a_rerun_resumes_it(tmp_path):
    args = [sys.executable, "-m", "diagnose", "sweep", *TINY, "--no-probes", "--steps", "300", "--depth", "3,1",
            "--checkpoint-every", "5", "--workers", "1", "--threads", "1", "--out", str(tmp_path / "sw")]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed = None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "sw").glob("*_d3_*"))
        if runs and (runs[0] / "checkpoint.pt").is_file() and (pid := _worker_pid(proc.pid)):
            before = (runs[0] / "metrics.jsonl").read_text().splitlines()
            os.kill(pid, signal.SIGKILL)  # the first run (the deeper one) dies mid-run, as under the OOM killer
            killed = runs[0]
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed is not None, f"the first run ended before it could be killed\n{stdout}\n{stderr[-3000:]}"
    assert proc.returncode == 1, stdout + stderr[-3000:]
    assert f"{killed.name}: failed (worker process died (exit code -9))" in stdout, stdout
    assert "(1 finished, 0 diverged, 1 failed)" in stdout, stdout
    shallow = next((tmp_path / "sw").glob("*_d1_*"))
    assert json.loads((shallow / "status.json").read_text())["state"] == "finished"

    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "1 already done, 1 to run" in again.stdout, again.stdout + again.stderr[-3000:]
    assert json.loads((killed / "status.json").read_text())["state"] == "finished"
    steps = [line["step"] for line in _train_lines(killed) if "loss" in line]
    assert steps == list(range(300))  # every step once: no gap, no repeat
    # Resumed, not restarted: the lines written up to the checkpoint are kept as they were (timings included).
    kept = (killed / "metrics.jsonl").read_text().splitlines()
    ckpt_lines = [line for line in before if json.loads(line)["step"] < 5]
    assert ckpt_lines and kept[:len(ckpt_lines)] == ckpt_lines


def test_workers_are_spawned_not_forked_beside_another_thread():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        pool = WarmPool(fail_on_odd, 1)
        assert pool.start_method == "spawn"
        assert dict(pool.run([(2,)])) == {0: 20}
    finally:
        stop.set()
        other.join()
    assert not fork_is_safe() or threading.active_count() == 1


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_warm_pool_survives_exceptions_and_dead_workers(start_method):
    pool = WarmPool(fail_on_odd, 2, start_method=start_method)
    outcomes = dict(pool.run([(x,) for x in range(6)]))
    assert outcomes[0] == 0 and outcomes[2] == 20 and outcomes[4] == 40 and outcomes[5] == JobFailed(
        "ValueError: odd 5")
    assert outcomes[3] == JobFailed("worker process died (exit code 5)")
    assert outcomes[1] == JobFailed("ValueError: odd 1")
    # The timeline: every job sent and collected once; every reply received but that of the dead worker.
    events = [(e["event"], e.get("job")) for e in pool.timeline]
    assert sorted(j for e, j in events if e == "sent") == sorted(j for e, j in events if e == "collected") == list(
        range(6))
    assert sorted(j for e, j in events if e == "received") == [0, 1, 2, 4, 5]


def _spec(depth: int, width: int, steps: int) -> dict:
    from trainer.loop import RunSpec, TrainConfig
    from trainer.model import ModelConfig
    from trainer.parameterization import Parameterization

    return RunSpec(Parameterization(width=width, depth=depth), ModelConfig(), train=TrainConfig(steps=steps)).to_dict()


def test_schedule_puts_the_costliest_runs_first_and_keeps_grid_order_on_ties():
    todo = [(_spec(d, w, s), None, f"d{d}w{w}s{s}", False) for d, w, s in
            [(2, 64, 10), (8, 64, 10), (4, 256, 10), (4, 64, 40), (2, 64, 10)]]
    order = [job[2] for job in schedule(todo)]
    assert order == ["d4w256s10", "d4w64s40", "d8w64s10", "d2w64s10", "d2w64s10"]
    assert run_cost(_spec(8, 64, 10)) > 3.5 * run_cost(_spec(2, 64, 10))  # about 4x: cost ∝ depth


def test_pool_shape_fills_the_cores_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = cpu_cores()
    workers, threads = pool_shape(100, None, None)
    assert (workers, threads) == (cores, 1)
    assert pool_shape(1, None, None) == (1, cores)  # one run: one worker with every core
    assert pool_shape(100, None, 2) == (max(1, cores // 2), 2)
    assert pool_shape(100, 3, 5) == (3, 5)  # what the user says goes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert pool_shape(100, 1, None) == (1, 1)


def test_report_without_probes_fails_before_any_run(tmp_path):
    result = CliRunner().invoke(main, ["sweep", *TINY, "--steps", "2", "--depth", "1,2", "--no-probes", "--report",
                                       "--out", str(tmp_path / "sw")])
    assert result.exit_code == 1 and "--report needs probe records" in result.output, result.output
    assert not (tmp_path / "sw").exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_workers_end_when_the_sweep_process_is_killed():
    code = ("from diagnose.workers import WarmPool\nfrom tests.scaleout._pool_jobs import nap\n"
            "print(list(WarmPool(nap, 1).run([(120,)])))")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while (worker := _worker_pid(parent.pid)) is None and time.time() < deadline:
        time.sleep(0.05)
    assert worker is not None, parent.stderr.read() if parent.poll() is not None else "no worker started"
    parent.kill()  # SIGKILL: no clean-up code of the parent runs
    parent.wait()
    deadline = time.time() + 30
    while Path(f"/proc/{worker}").exists() and time.time() < deadline:
        try:  # reap it if it became our child (a subreaper); otherwise init does
            os.waitpid(worker, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    state = Path(f"/proc/{worker}/stat").read_text().split()[2] if Path(f"/proc/{worker}").exists() else "gone"
    assert state in ("gone", "Z"), f"worker {worker} still running ({state}) after its sweep was killed"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_preload_leaves_the_sweep_process_safe_to_fork():
    """preload_for_runs starts no thread (the sweep process then forks its workers): it runs no torch
    operation, so no OpenMP pool exists; the one thread numpy's OpenBLAS starts at import (and stops and
    restarts around a fork itself) is there before it. What a run needs is imported, torch.optim's lazy
    torch._dynamo included."""
    code = ("import os, sys, threading, numpy\nthreads = lambda: len(os.listdir('/proc/self/task'))\n"
            "before = threads()\nfrom diagnose.sweep import preload_for_runs\n"
            "preload_for_runs([{'data': {'source': 'shakespeare'}}])\n"
            "print(before, threads(), threading.active_count(), "
            "all(m in sys.modules for m in ('torch._dynamo', 'torch.func', 'zarr', 'xarray', 'probes.recorder')))")
    # Two OpenMP threads allowed: a parallel torch operation in the preload would leave a pool thread.
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), "OMP_NUM_THREADS": "2"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after, python_threads, imported = proc.stdout.split()
    assert after == before and python_threads == "1" and imported == "True", proc.stdout

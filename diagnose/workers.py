"""Warm worker processes for local sweeps: each starts warm and runs job after job.

A run of a small sweep trains for a second or two; a fresh Python process importing torch, xarray
and the toolkit takes several. So a local sweep keeps `workers` long-lived processes that keep what
they loaded (modules, the parsed corpus, torch's kernels and torch.func's first-call setup) across
the runs they execute. On Linux they are forked from the sweep process after it has imported what
the runs need (`preload`), so those imports are paid once per sweep, not once per worker; elsewhere
(or with start_method="spawn") each starts as a clean interpreter and imports for itself.

Fork safety: the sweep process only imports and reads files before it forks; it runs no torch
operation (so no OpenMP thread pool exists to be inherited half-initialized) and starts no thread of
its own: workers are forked only while the process has no other Python thread (`fork_is_safe`; else
they are spawned, e.g. a replacement started beside the progress bar's thread, or a sweep started
inside a process that runs threads); each worker closes the pipes of the workers forked before it.
Every run still builds its own Trainer, seeds its own RNGs and writes its own run dir, so a run is the
same in a warm worker as in a fresh process (tests/scaleout/test_sweep_workers.py checks it bit for bit).

Unlike `concurrent.futures.ProcessPoolExecutor`, whose pool breaks for good when one worker dies, a
worker that is killed (out of memory, a segfault, `kill -9`) costs only the run it was executing:
that run is reported as failed, a fresh worker takes its place and the other runs go on. A sweep that
is itself killed takes its workers with it (they watch their parent), leaving each run interrupted at
its last checkpoint, for a re-run to resume.

Jobs are handed out in the order given: the caller sorts them longest first, so the long runs do not
end up alone at the end of the sweep (see `diagnose.sweep.schedule`). `WarmPool.timeline` records when
each worker started and when each job was sent, received, returned and collected (time.time(), s).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class JobFailed:
    """A job that raised (`message`: the exception's first line) or whose worker died."""

    message: str


def _exit_with(parent: int) -> None:
    """End this worker, mid-run if need be, once the sweep that started it is gone (killed, not closed):
    no orphan keeps writing into a run dir that a re-run of the sweep would resume."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _serve(conn: Connection, fn: Callable[..., Any], parent: int, inherited: Sequence[Connection] = ()) -> None:
    """A worker's loop: receive argument tuples, send back ("ok", result, "", received at) or
    ("error", message, traceback, received at).

    `parent`: the sweep's pid, passed in (not read here: the sweep may already be gone by now).
    `inherited`: the sweep's ends of the pipes to workers forked earlier; closed here, so that only
    the sweep holds them."""
    for other in inherited:
        other.close()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    while True:
        try:
            args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if args is None:  # the pool is closing
            return
        received = time.time()
        try:
            reply = ("ok", fn(*args), "", received)
        except BaseException as err:  # noqa: BLE001 - one failing run must not end the worker
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reply = ("error", f"{type(err).__name__}: {first}" if first else type(err).__name__,
                     traceback.format_exc(limit=-3), received)
            if isinstance(err, KeyboardInterrupt):
                conn.send(reply)
                return
        conn.send(reply)


def fork_is_safe() -> bool:
    """On Linux, and with no Python thread but this one: a thread that holds a lock at the fork (a
    logging, progress-bar or live-sink lock) leaves the worker's copy locked for good (seen: a sweep
    started inside a test process whose W&B and TensorBoard sinks ran threads hung in its worker).
    macOS's system libraries are not fork-safe; Windows has no fork."""
    return sys.platform.startswith("linux") and threading.active_count() == 1


def default_start_method() -> str:
    """fork where `fork_is_safe` (workers start with the sweep's imports done), else spawn."""
    return "fork" if fork_is_safe() else "spawn"


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    job: int | None = None  # index of the job it is running


class WarmPool:
    """`workers` processes that each call `fn(*args)` for one job at a time and stay alive in between.

    `run(jobs)` yields (job index, result or JobFailed) as jobs finish. A job that raises gives
    JobFailed with the exception's first line; a worker that dies gives JobFailed naming its exit
    code, and is replaced by a fresh one. `fn` must be importable by name (spawn pickles it so).
    `preload`: called once in this process before the first worker is forked (imports, caches the
    workers then share); with spawn it is not called, each worker pays its own imports.
    """

    def __init__(self, fn: Callable[..., Any], workers: int, start_method: str | None = None,
                 preload: Callable[[], None] | None = None):
        if workers <= 0:
            raise ValueError(f"workers={workers} must be a positive integer")
        self.fn, self.n = fn, workers
        self.start_method = start_method or default_start_method()
        self._ctx = multiprocessing.get_context(self.start_method)
        self._preload = preload if self.start_method == "fork" else None
        self._workers: list[_Worker] = []
        self.timeline: list[dict[str, Any]] = []

    def _mark(self, event: str, worker: _Worker | None = None, job: int | None = None, t: float | None = None):
        self.timeline.append({"event": event, "t": time.time() if t is None else t,
                              **({"worker": worker.process.pid} if worker else {}),
                              **({"job": job} if job is not None else {})})

    def _start(self) -> _Worker:
        # A worker that replaces a dead one after the progress bar's thread started is spawned.
        fork = self.start_method == "fork" and fork_is_safe()
        ctx = multiprocessing.get_context("spawn") if self.start_method == "fork" and not fork else self._ctx
        if fork and self._preload is not None:
            self._preload()
            self._preload = None
            self._mark("preloaded")
        if fork:
            # Everything loaded so far lives as long as the processes: out of the garbage collector's
            # sight, the workers' full collections do not walk it again and again (torch._dynamo and
            # sympy are ~10⁶ objects), nor does the sweep's own exit (1.2 s of a loaded machine).
            gc.freeze()
        parent, child = ctx.Pipe()
        inherited = [w.conn for w in self._workers] if fork else []
        process = ctx.Process(target=_serve, args=(child, self.fn, os.getpid(), inherited), daemon=True)
        process.start()
        child.close()  # the parent keeps only its end: a dead worker then reads as EOF here
        worker = _Worker(process, parent)
        self._mark("started", worker)
        return worker

    def start(self, count: int | None = None) -> None:
        """Start the workers now (at most `count`), rather than as the first jobs arrive: a sweep does
        this before it starts a progress bar's thread, so no worker is forked beside another thread."""
        while len(self._workers) < min(self.n, self.n if count is None else count):
            self._workers.append(self._start())

    def run(self, jobs: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        pending = list(range(len(jobs)))[::-1]  # pop() from the end hands out jobs in the given order
        try:
            while pending or any(w.job is not None for w in self._workers):
                while pending and (idle := self._idle()) is not None:
                    idle.job = pending.pop()
                    self._mark("sent", idle, idle.job)
                    idle.conn.send(jobs[idle.job])
                busy = [w for w in self._workers if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    if worker.conn not in ready and worker.process.sentinel not in ready:
                        continue
                    job, outcome = worker.job, self._collect(worker)
                    self._mark("collected", worker, job)
                    worker.job = None
                    yield job, outcome
        finally:
            self.close()

    def _idle(self) -> _Worker | None:
        """An idle live worker, starting one if the pool is not full yet (dead ones are dropped)."""
        self._workers = [w for w in self._workers if w.process.is_alive() or w.job is not None]
        for worker in self._workers:
            if worker.job is None:
                return worker
        if len(self._workers) < self.n:
            self._workers.append(self._start())
            return self._workers[-1]
        return None

    def _collect(self, worker: _Worker) -> Any:
        """The finished job's result, or JobFailed if it raised or the worker died."""
        try:
            if worker.conn.poll():
                status, value, _, received = worker.conn.recv()
                self._mark("received", worker, worker.job, received)
                return value if status == "ok" else JobFailed(value)
        except (EOFError, OSError):
            pass
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        worker.conn.close()
        self._workers.remove(worker)
        return JobFailed(f"worker process died (exit code {code})")

    def close(self) -> None:
        """Ask idle workers to exit; end busy ones (an interrupted sweep); wait for all."""
        for worker in self._workers:
            try:
                if worker.job is None:
                    worker.conn.send(None)
                else:
                    worker.process.terminate()
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

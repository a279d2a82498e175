"""Warm worker processes for local sweeps: each imports once and runs job after job.

A run of a small sweep trains for a second or two; a fresh Python process importing torch, xarray
and the toolkit takes several. So a local sweep starts `workers` long-lived processes (spawn: a
clean interpreter, no forked torch state) that keep what they loaded (modules, the parsed corpus,
torch's kernels and torch.func's first-call setup) across the runs they execute. Every run still
builds its own Trainer, seeds its own RNGs and writes its own run dir, so a run is the same in a
warm worker as in a fresh process (tests/scaleout/test_sweep_workers.py checks it bit for bit).

Unlike `concurrent.futures.ProcessPoolExecutor`, whose pool breaks for good when one worker dies, a
worker that is killed (out of memory, a segfault, `kill -9`) costs only the run it was executing:
that run is reported as failed, a fresh worker takes its place and the other runs go on. A sweep that
is itself killed takes its workers with it (they watch their parent), leaving each run interrupted at
its last checkpoint, for a re-run to resume.

Jobs are handed out in the order given: the caller sorts them longest first, so the long runs do not
end up alone at the end of the sweep (see `diagnose.sweep.schedule`).
"""

from __future__ import annotations

import multiprocessing
import os
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


def _serve(conn: Connection, fn: Callable[..., Any], parent: int) -> None:
    """A worker's loop: receive argument tuples, send back ("ok", result) or ("error", message).

    `parent`: the sweep's pid, passed in (not read here: the sweep may already be gone by now)."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    while True:
        try:
            args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if args is None:  # the pool is closing
            return
        try:
            reply = ("ok", fn(*args))
        except BaseException as err:  # noqa: BLE001 - one failing run must not end the worker
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reply = ("error", f"{type(err).__name__}: {first}" if first else type(err).__name__,
                     traceback.format_exc(limit=-3))
            if isinstance(err, KeyboardInterrupt):
                conn.send(reply)
                return
        conn.send(reply)


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
    """

    def __init__(self, fn: Callable[..., Any], workers: int):
        if workers <= 0:
            raise ValueError(f"workers={workers} must be a positive integer")
        self.fn, self.n = fn, workers
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child, self.fn, os.getpid()), daemon=True)
        process.start()
        child.close()  # the parent keeps only its end: a dead worker then reads as EOF here
        return _Worker(process, parent)

    def run(self, jobs: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        pending = list(range(len(jobs)))[::-1]  # pop() from the end hands out jobs in the given order
        try:
            while pending or any(w.job is not None for w in self._workers):
                while pending and (idle := self._idle()) is not None:
                    idle.job = pending.pop()
                    idle.conn.send(jobs[idle.job])
                busy = [w for w in self._workers if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    if worker.conn not in ready and worker.process.sentinel not in ready:
                        continue
                    job, outcome = worker.job, self._collect(worker)
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
                status, value, *_ = worker.conn.recv()
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

"""Replay a stretch of a run with dense probes: the mechanics behind `diagnose replay RUN --step S`.

The run is restarted from its nearest checkpoint at or before S − lead (a kept one,
`checkpoints/step_<C>.pt`, or the latest `checkpoint.pt`; or from initialization when none is early
enough) into `<run>/replay_<S>/`, and trained to S + after with the probes on at every step. The
exact-resume guarantee (model, optimizer, RNG, data position and the probes' references are in the
checkpoint; batches are a function of seed and step) makes the replayed training bitwise the same
as the original's: `replay` checks it against the original metrics.jsonl and says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from probes.recorder import ProbeConfig, ProbeRecorder
from trainer import checkpoint as ckpt
from trainer.errors import ConfigError
from trainer.loop import CONFIG_NAME, METRICS_NAME, NonFiniteLoss, RunSpec, Trainer, read_metrics

REPLAY_PREFIX = "replay_"


def stored_run(run_dir: Path) -> tuple[RunSpec, ProbeConfig]:
    """The spec a run was made with and its probe config (defaults when it ran without probes)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run dir (no {CONFIG_NAME})")
    stored = json.loads(path.read_text())
    probes = stored.get("probes") or {}
    return RunSpec.from_dict(stored), ProbeConfig(**{"lin_batch_size": 0, **probes})


def checkpoint_before(run_dir: Path, step: int) -> tuple[int, Path | None]:
    """(C, path) of the latest checkpoint with C ≤ step; (0, None) when none is that early."""
    run_dir = Path(run_dir)
    best: tuple[int, Path | None] = (0, None)
    for s in ckpt.kept_steps(run_dir):
        if s <= step:
            best = max(best, (s, ckpt.kept_path(run_dir, s)), key=lambda b: b[0])
    latest = run_dir / ckpt.CHECKPOINT_NAME
    if latest.is_file():
        s = int(ckpt.load(latest)["step"])
        if best[0] < s <= step:
            best = (s, latest)
    return best


def replay(run_dir: str | Path, step: int, after: int = 3, lead: int = 8, out: str | Path | None = None,
           quiet: bool = True) -> dict[str, Any]:
    """Re-run `run_dir` from the checkpoint at or before `step − lead` to `step + after` with probes at
    every step, into `out` (default `<run>/replay_<step>`). Returns {"dir", "start", "stop",
    "bitwise" (the replayed losses and gradient norms equal the original's, None if it has none to
    compare), "compared" (steps compared), "error" (a non-finite loss ended the replay, else "")}."""
    run_dir = Path(run_dir)
    spec, probe_cfg = stored_run(run_dir)
    total = spec.train.steps
    if not 0 <= step < total:
        raise ConfigError(f"--step {step} is outside the run's steps 0..{total - 1}")
    if after < 0 or lead < 1:
        raise ConfigError(f"after={after} must be >= 0 and lead={lead} >= 1")
    start, source = checkpoint_before(run_dir, max(step - lead, 0))
    stop = min(step + after + 1, total)
    out = Path(out) if out is not None else run_dir / f"{REPLAY_PREFIX}{step}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    dense = replace(probe_cfg, every=1, early=False, health=True, health_every=1)
    config.update(probes=dense.to_dict(), replay_of={"run": str(run_dir), "step": step, "start": start,
                                                     "stop": stop})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    original = [r for r in read_metrics(run_dir / METRICS_NAME) if "loss" in r]
    (out / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in original if r["step"] < start))
    # Checkpoints of the replay go to its own dir; it keeps none of them.
    spec = replace(spec, train=replace(spec.train, keep_checkpoints_every=0))
    extra = {"probes": dense.to_dict(), "replay_of": config["replay_of"]}
    trainer = Trainer(spec, out, observers=[ProbeRecorder(dense, out, spec)], extra_config=extra, quiet=quiet)
    error = ""
    try:
        if source is not None:
            shutil.copyfile(source, out / ckpt.CHECKPOINT_NAME)
            trainer.run(resume=True, until=stop)
        else:
            trainer.run(until=stop)
    except NonFiniteLoss as err:
        error = str(err)
    replayed = {r["step"]: r for r in read_metrics(out / METRICS_NAME) if "loss" in r and r["step"] >= start}
    compared = [r["step"] for r in original if r["step"] in replayed]
    same = all(replayed[r["step"]]["loss"] == r["loss"] and replayed[r["step"]]["grad_norm"] == r["grad_norm"]
               for r in original if r["step"] in replayed)
    return {"dir": out, "start": start, "stop": stop, "step": step, "bitwise": same if compared else None,
            "compared": compared, "error": error}

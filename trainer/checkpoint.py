"""Atomic checkpoints that load without unpickling code (`torch.load(weights_only=True)`).

A checkpoint holds model, optimizer (with the schedule's step), RNG states and the next step to run;
batches are a function of (seed, step), so the step is the whole data position. Observers add their
own tensors under "observers". The file is written to a temporary name in the same folder, flushed
to disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
KEPT_DIR = "checkpoints"  # checkpoints kept every `keep_checkpoints_every` steps: step_<S>.pt


def kept_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / KEPT_DIR / f"step_{step:08d}.pt"


def kept_steps(run_dir: Path) -> list[int]:
    """Steps of the kept checkpoints in a run dir, sorted."""
    return sorted(int(p.stem.removeprefix("step_")) for p in (Path(run_dir) / KEPT_DIR).glob("step_*.pt"))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to `path` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)

"""Atomic checkpoints that load without unpickling code (`torch.load(weights_only=True)`).

A checkpoint holds model, optimizer (with the schedule's step), RNG states and the next step to run;
batches are a function of (seed, step), so the step is the whole data position. Observers add their
own tensors under "observers". The file is written to a temporary name in the same folder, flushed
to disk and renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.

The trainer also keeps the checkpoint before the latest, as `checkpoint.prev.pt` (a hard link to the
old file, made before the new one is renamed into place, so `checkpoint.pt` never goes missing). A
latest checkpoint damaged afterwards (a truncated copy, a disk error, a file overwritten by mistake)
cannot be read; `load_latest` then says what is wrong with it and falls back to the previous one.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
DAMAGED_NAME = "checkpoint.damaged.pt"  # an unreadable latest checkpoint, kept for inspection
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


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


def _link_or_copy(src: Path, dst: Path, link: bool = True) -> None:
    """Make `dst` a file with `src`'s bytes, atomically (via a temporary name beside `dst`): a hard
    link when `link` and the file system has them, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError("copy asked for")
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FAT file systems)
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def keep_copy(path: Path, kept: Path) -> None:
    """Keep the checkpoint just written at `path` also as `kept` (a hard link where the file system has
    them, else a copy; atomic). Safe to share bytes: checkpoints are replaced by rename, never rewritten."""
    kept.parent.mkdir(exist_ok=True)
    _link_or_copy(Path(path), Path(kept))


def save_keeping_previous(obj: dict[str, Any], path: Path) -> None:
    """`save_atomic`, keeping the file it replaces as PREVIOUS_NAME beside it.

    Order: the new file is written in full first; then the old one is linked (copied where the file
    system has no hard links) to the previous name; then the new one is renamed over the latest. A
    crash at any point leaves a complete latest checkpoint, and the previous one once there is one.
    """
    path = Path(path)
    previous = path.with_name(PREVIOUS_NAME)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if path.is_file():
        _link_or_copy(path, previous)
    os.replace(tmp, path)


def promote_previous(run_dir: Path) -> None:
    """After falling back: the previous checkpoint becomes the latest again, and the unreadable latest
    is kept as DAMAGED_NAME, so that the next save does not keep a damaged file as "previous". The
    latest name never goes missing (every step is a link or copy, then an atomic rename)."""
    run_dir = Path(run_dir)
    latest = run_dir / CHECKPOINT_NAME
    if latest.is_file():
        _link_or_copy(latest, run_dir / DAMAGED_NAME)
    _link_or_copy(run_dir / PREVIOUS_NAME, latest, link=False)  # two files: damage to one spares the other


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing any pickled code."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def _what_is_wrong(path: Path, err: Exception) -> str:
    """One line: why `path` could not be loaded, from its first bytes and torch's first error line."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]  # first sentence
    if head != _ZIP_MAGIC:
        return f"is not a torch checkpoint ({size:,} bytes that do not start with torch.save's zip header)"
    if isinstance(err, pickle.UnpicklingError):
        return f"holds objects that a weights-only load refuses ({detail})"
    return f"is truncated or corrupted ({size:,} bytes; torch: {detail})"


def read(path: Path, map_location: str | torch.device = "cpu", required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`load`, with one CheckpointError line naming the file and the defect instead of torch's traceback.

    `required`: top-level keys the checkpoint must hold (the trainer's: model, optimizer, step, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = load(path, map_location)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{path} {_what_is_wrong(path, err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a checkpoint written by this trainer")
    return state


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu",
                required: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path, list[str]]:
    """(state, the file it came from, what was wrong with the files tried before it).

    Tries CHECKPOINT_NAME, then PREVIOUS_NAME; a CheckpointError naming both when neither can be read.
    """
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        try:
            return read(run_dir / name, map_location, required), run_dir / name, problems
        except CheckpointError as err:
            problems.append(str(err))
    if not (run_dir / CHECKPOINT_NAME).is_file() and not (run_dir / PREVIOUS_NAME).is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {run_dir / CHECKPOINT_NAME}")
    raise CheckpointError(f"cannot resume: {'; and '.join(problems)}; no readable checkpoint is left: "
                          f"start the run again in a new --out (or after removing {run_dir})")

"""The probe recorder: an observer of the training loop that measures on a schedule and writes records.

Schedule: step 0, a log-spaced early schedule (1, 2, 4, 8, ... below `every`, since early steps move
most), every `every` steps, and the last step. At each probe step the values stay on the device and
reach the host in one transfer; they are appended to the zarr store every `flush_every` probe steps, or
sooner once `flush_seconds` have passed since the last append (so that a reader of a slow run is never
far behind), and at every checkpoint. An append costs about the same whatever it carries (~0.1 s on a
CPU, mostly zarr metadata), which is why it is batched.
Probes run on rank 0 only, on the eager module behind any DDP or compile wrapper.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probes.adapters import GPTAdapter
from probes.schema import SCHEMA_VERSION, STORE_NAME, coords_for
from probes.session import ProbeSession
from probes.statistics import USER_STATISTICS
from probes.store import RecordStore
from trainer.errors import ConfigError
from trainer.observers import Observer

if TYPE_CHECKING:
    from trainer.loop import RunSpec, Trainer

PROBE_DTYPES = ("auto", "float64", "float32")


@dataclass(frozen=True)
class ProbeConfig:
    every: int = 25  # probe every K steps (plus step 0, the early log schedule and the last step)
    early: bool = True  # also probe at 1, 2, 4, 8, ... below `every`
    batch_size: int = 8  # sequences in the fixed probe batch (held-out data)
    dtype: str = "auto"  # linearization precision: auto = float64 on CPU, float32 on CUDA
    # Sequences of the probe batch (the first ones) over which the linearization error is evaluated;
    # 0 = all. Two sequences move the ratios by a median 0.6% (max 4%) against eight, far below the
    # depth effect they measure (docs/PROBES.md), at a quarter of the float64 cost.
    lin_batch_size: int = 2
    flush_every: int = 32  # probe steps buffered before each append to the store ...
    flush_seconds: float = 60.0  # ... or fewer, once this long has passed since the last append
    seed: int = 0  # which held-out windows form the probe batch

    def __post_init__(self) -> None:
        for name in ("every", "batch_size", "flush_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"probe {name}={value!r} must be a positive integer")
        if not isinstance(self.lin_batch_size, int) or self.lin_batch_size < 0:
            raise ConfigError(f"probe lin_batch_size={self.lin_batch_size!r} must be a non-negative integer "
                              "(0: the whole probe batch)")
        if not self.flush_seconds > 0:
            raise ConfigError(f"probe flush_seconds={self.flush_seconds!r} must be positive")
        if self.dtype not in PROBE_DTYPES:
            raise ConfigError(f"probe dtype {self.dtype!r} is not one of {', '.join(PROBE_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_steps(total_steps: int, every: int, early: bool = True) -> list[int]:
    """Sorted probe steps in [0, total_steps): 0, powers of two below `every`, multiples of `every`, last."""
    steps = {0, total_steps - 1} | set(range(0, total_steps, every))
    if early:
        steps |= {2**k for k in range(int(math.log2(max(every, 1))) + 1) if 2**k < min(every, total_steps)}
    return sorted(s for s in steps if 0 <= s < total_steps)


def versions() -> dict[str, str]:
    import xarray
    import zarr

    return {"torch": torch.__version__, "numpy": np.__version__, "xarray": xarray.__version__,
            "zarr": zarr.__version__, "schema": str(SCHEMA_VERSION)}


class ProbeRecorder(Observer):
    """Records probes during `Trainer.run` into `<run_dir>/probes.zarr`."""

    name = "probes"

    def __init__(self, config: ProbeConfig, run_dir: Path, spec: RunSpec):
        self.config, self.run_dir, self.spec = config, Path(run_dir), spec
        self.steps = set(probe_steps(spec.train.steps, config.every, config.early))
        self.session: ProbeSession | None = None
        self._state: dict[str, Any] = {}
        self._buffer: list[tuple[int, dict[str, np.ndarray]]] = []
        self._store: RecordStore | None = None
        self._last_flush = time.monotonic()

    def wants(self, step: int) -> bool:
        return step in self.steps

    def _setup(self, trainer: Trainer) -> None:
        if self.session is not None:
            return
        device = trainer.device
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "float32" if device.type == "cuda" else "float64"
        batch = trainer.data.probe_batch(self.config.batch_size, self.config.seed).to(device)
        self.session = ProbeSession(GPTAdapter(trainer.eager_model), batch, getattr(torch, dtype),
                                    lin_batch_size=self.config.lin_batch_size or None)
        if self._state:
            self.session.load_state_dict(self._state)
        p = self.spec.param
        attrs = {
            "param": p.name, "alpha": p.alpha if p.uses_depth else math.nan, "width": p.width,
            "depth": p.depth, "seed": self.spec.train.seed, "lr": p.lr_base, "label": p.label,
            "schema_version": SCHEMA_VERSION, "config": json.dumps(self.spec.to_dict()),
            "probe_config": json.dumps(self.config.to_dict()), "versions": json.dumps(versions()),
            "probe_dtype": dtype,
        }
        groups = [g["name"] for g in trainer.optimizer.param_groups]
        extra = {name: stat.dims for name, stat in USER_STATISTICS.items()}
        self._store = RecordStore(self.run_dir / STORE_NAME, coords_for(p.depth, groups), attrs, extra)

    def before_update(self, step: int, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self._setup(trainer)
        self.session.before_update(step)

    def after_update(self, step: int, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        values = self.session.after_update(step)
        values["train_loss"] = trainer.last_loss.float()
        values["effective_lr"] = torch.tensor([g["lr"] for g in trainer.optimizer.param_groups])
        # One device→host transfer for the whole probe step.
        names = list(values)
        flat = torch.cat([values[n].detach().reshape(-1).double().to(trainer.device) for n in names]).cpu().numpy()
        row, offset = {}, 0
        for n in names:
            size = values[n].numel()
            row[n] = flat[offset : offset + size].reshape(tuple(values[n].shape))
            offset += size
        row["val_loss"] = np.asarray(trainer.last_val_loss)
        self._buffer.append((step, row))
        if (len(self._buffer) >= self.config.flush_every
                or time.monotonic() - self._last_flush >= self.config.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self._buffer and self._store is not None:
            steps, rows = zip(*self._buffer)
            self._store.append(list(steps), list(rows))
            self._buffer.clear()
        self._last_flush = time.monotonic()

    def resume(self, step: int) -> None:
        store = RecordStore(self.run_dir / STORE_NAME, {}, {})
        store.truncate(step)

    def state_dict(self) -> dict[str, Any]:
        if self.session is None:
            return dict(self._state)
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state)
        if self.session is not None:
            self.session.load_state_dict(state)

    def close(self) -> None:
        self.flush()

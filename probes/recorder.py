"""The probe recorder: a `ProbeLog` driven by the toolkit's `Trainer`, as one of its observers.

Schedule: step 0, a log-spaced early schedule (1, 2, 4, 8, ... below `every`, since early steps move
most), every `every` steps, and the last step. Buffering, the single host transfer per probe step and
the appends to `<run_dir>/probes.zarr` are `ProbeLog`'s; the trainer's checkpoints also flush, so a
resume finds every probe step before its checkpoint on disk. Probes run on rank 0 only, on the eager
module behind any DDP or compile wrapper; under FSDP2 on every rank (a forward is a collective), and
rank 0 alone records.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probes.adapters import GPTAdapter
from probes.probe_log import FEATURE_BATCH_SIZE, FLUSH_EVERY, FLUSH_SECONDS, LIN_BATCH_SIZE, ProbeLog, group_names
from probes.schema import STORE_NAME
from probes.session import ProbeSession
from probes.store import RecordStore
from trainer.distributed import probes_on_every_rank
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
    # Linearization precision: float64 on every device ("auto" is kept for stored configs and now
    # means float64 too; it meant float32 on CUDA before). float32: values below the measured
    # round-off floor are NaN, flagged (probes/linearization.py).
    dtype: str = "float64"
    # Sequences of the probe batch (the first ones) over which the linearization error is evaluated;
    # 0 = all. Against all eight, one sequence of 64 tokens moved the layer-averaged ratios by a median
    # 1% (max 6%) on 18 depth-sweep checkpoints, where the depth effect is 4×, at a fifth of the
    # float64 cost (python -m benchmarks.lin_subset; benchmarks/RESULTS.md).
    lin_batch_size: int = LIN_BATCH_SIZE
    flush_every: int = FLUSH_EVERY  # probe steps buffered before each append to the store ...
    flush_seconds: float = FLUSH_SECONDS  # ... or fewer, once this long has passed since the last append
    seed: int = 0  # which held-out windows form the probe batch
    # Steps (log-spaced, ending at the last) at which the block-linearized model is evaluated
    # (probes.linearized_model; float64 on a CPU, its own store); 0 = off.
    linearized: int = 4
    # Sequences of the probe batch (the first ones) for the feature change since θ_0
    # (probes.feature_change); 0 = all. Two keep its cost near a fifth of a training step at k = 10
    # (benchmarks/RESULTS.md, "Laziness measures: cost").
    feature_batch_size: int = FEATURE_BATCH_SIZE

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


class ProbeRecorder(Observer):
    """Records probes during `Trainer.run` into `<run_dir>/probes.zarr`."""

    name = "probes"

    def __init__(self, config: ProbeConfig, run_dir: Path, spec: RunSpec):
        self.config, self.run_dir, self.spec = config, Path(run_dir), spec
        self.steps = set(probe_steps(spec.train.steps, config.every, config.early))
        self.log: ProbeLog | None = None
        self._state: dict[str, Any] = {}

    @property
    def session(self) -> ProbeSession | None:
        return None if self.log is None else self.log.session

    def wants(self, step: int) -> bool:
        return step in self.steps

    def _setup(self, trainer: Trainer) -> None:
        if self.log is not None:
            return
        batch = trainer.data.probe_batch(self.config.batch_size, self.config.seed).to(trainer.device)
        p = self.spec.param
        attrs = {
            "param": p.name, "alpha": p.alpha if p.uses_depth else math.nan, "width": p.width,
            "depth": p.depth, "seed": self.spec.train.seed, "lr": p.lr_base, "label": p.label,
            "config": json.dumps(self.spec.to_dict()), "probe_config": json.dumps(self.config.to_dict()),
        }
        self.log = ProbeLog(
            GPTAdapter(trainer.eager_model), batch, self.run_dir, steps=self.steps, attrs=attrs,
            groups=group_names(trainer.optimizer),
            dtype=None if self.config.dtype == "auto" else getattr(torch, self.config.dtype),  # None: float64
            lin_batch_size=self.config.lin_batch_size or None,
            feature_batch_size=self.config.feature_batch_size or None, flush_every=self.config.flush_every,
            flush_seconds=self.config.flush_seconds, append=True,  # a resumed run continues its store
            write=trainer.is_main,
        )
        if self._state:
            self.log.session.load_state_dict(self._state)

    def before_update(self, step: int, trainer: Trainer) -> None:
        if not (trainer.is_main or probes_on_every_rank(trainer.model)):
            return
        self._setup(trainer)
        self.log.before_update(step)

    def after_update(self, step: int, trainer: Trainer) -> None:
        if not (trainer.is_main or probes_on_every_rank(trainer.model)):
            return
        self.log.after_update(step, trainer.optimizer, train_loss=trainer.last_loss,
                              val_loss=trainer.last_val_loss)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

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

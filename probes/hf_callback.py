"""Probes inside a Hugging Face `Trainer`: `ProbeCallback`.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[ProbeCallback(probe_batch, "runs/mine", steps=range(0, 1000, 25))])
    trainer.train()       # probes.zarr is written to runs/mine; analyses.open_run reads it

The Trainer calls `on_pre_optimizer_step` after gradient clipping and right before `optimizer.step()`,
and `on_optimizer_step` right after it; these are `ProbeLog.before_update` / `after_update`, so a probe
step measures exactly the update the optimizer applied. The step recorded is `state.global_step`
(updates applied before this one), as in the toolkit's own runs. The callback only reads the model
and the optimizer: training is bitwise the same with it or without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from probes.adapters import ModelAdapter, adapter_for
from probes.probe_log import LIN_BATCH_SIZE, ProbeLog


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Probes run on the eager module behind DDP (`module`) or torch.compile (`_orig_mod`).
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class ProbeCallback(TrainerCallback):
    """Records probes around the Trainer's optimizer steps into `<run_dir>/probes.zarr`.

    `probe_batch`: a fixed (b, t+1) token batch (held-out data); `steps`: the probe steps (None: every
    step); `adapter`: default `adapter_for(model)`; the rest are `ProbeLog`'s options (`attrs`, `dtype`,
    `lin_batch_size`, `live`, ...). Probes run on the main process only.
    """

    def __init__(self, probe_batch: torch.Tensor, run_dir: str | Path, *, steps: Iterable[int] | None = None,
                 adapter: ModelAdapter | None = None, lin_batch_size: int | None = LIN_BATCH_SIZE,
                 **probe_log_options: Any):
        self.probe_batch, self.run_dir, self.steps = probe_batch, Path(run_dir), steps
        self.adapter, self.lin_batch_size, self.options = adapter, lin_batch_size, probe_log_options
        self.log: ProbeLog | None = None
        self._step: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.log is None:
            model = _unwrap(model)
            device = next(model.parameters()).device
            attrs = {"lr": float(args.learning_rate), "seed": int(args.seed), **self.options.pop("attrs", {})}
            self.log = ProbeLog(self.adapter or adapter_for(model), self.probe_batch.to(device), self.run_dir,
                                steps=self.steps, attrs=attrs, lin_batch_size=self.lin_batch_size,
                                **self.options)
        if self.log.wants(state.global_step):
            self._step = state.global_step
            self.log.before_update(self._step)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._step is not None:
            step, self._step = self._step, None
            self.log.after_update(step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.log is not None:
            self.log.close()

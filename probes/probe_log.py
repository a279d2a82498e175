"""Probes around the optimizer updates of any training loop, written to a store: `ProbeLog`.

    log = ProbeLog(adapter, probe_batch, "runs/mine", attrs={"param": "sp", "width": 768, "depth": 12})
    for step in range(steps):
        loss = adapter.loss(batch); loss.backward()
        with log.update(step, optimizer=optimizer, train_loss=loss):   # probes only at scheduled steps
            optimizer.step()
        optimizer.zero_grad()
    log.close()

At a probe step the values stay on the device and reach the host in one transfer; they are appended
to `<dir>/probes.zarr` every `flush_every` probe steps, or sooner once `flush_seconds` have passed
since the last append (so that a reader of a slow run is never far behind), and on `flush()`/`close()`.
An append costs about the same whatever it carries (~0.1 s on a CPU, mostly zarr metadata), which
is why it is batched. `ProbeRecorder` is this, driven by the toolkit's own `Trainer`.

Several processes: only the writing process (by default rank 0) touches the store. Around an FSDP2
loop, create the `ProbeLog` and call `update` on every rank: a probe step is then a collective (see
`probes.session`), and every rank measures the same values; rank 0 records them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.adapters import ModelAdapter
from probes.health import health_coords
from probes.schema import SCHEMA_VERSION, STORE_NAME, VARIABLES, coords_for
from probes.session import ProbeSession
from probes.statistics import USER_STATISTICS
from probes.store import RecordStore
from trainer.distributed import is_main_process

# Defaults shared with `ProbeConfig` (the recorder's settings). Why these values: ProbeConfig's comments.
LIN_BATCH_SIZE = 1  # probe sequences the linearization error is evaluated on
FEATURE_BATCH_SIZE = 2  # probe sequences the feature change since θ_0 is evaluated on
FLUSH_EVERY = 64  # probe steps per store append (one 64-step chunk per variable) ...
FLUSH_SECONDS = 60.0  # ... or fewer, once this long has passed since the last append

# Identity attributes that `analyses` reads to place a run in a sweep. A model built without µP or
# depth scaling (a stock Hugging Face model, say) is standard-parameterized: "sp" is the default.
IDENTITY_DEFAULTS: dict[str, Any] = {"param": "sp", "alpha": math.nan, "width": 0, "depth": 0, "seed": 0,
                                     "lr": math.nan, "label": ""}


def check_identity(attrs: dict[str, Any]) -> None:
    """The parameterization attributes must be ones the analyses know (they carry its theory)."""
    param, alpha = attrs["param"], attrs["alpha"]
    if param not in ("sp", "mup", "alpha"):
        raise ValueError(f"attrs param={param!r} must be 'sp', 'mup' or 'alpha' (with alpha in [0.5, 1])")
    if param == "alpha" and not (isinstance(alpha, (int, float)) and 0.5 <= alpha <= 1):
        raise ValueError(f"attrs alpha={alpha!r} must be a number in [0.5, 1] for param 'alpha'")


def versions() -> dict[str, str]:
    import xarray
    import zarr

    return {"torch": torch.__version__, "numpy": np.__version__, "xarray": xarray.__version__,
            "zarr": zarr.__version__, "schema": str(SCHEMA_VERSION)}


def to_host(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, np.ndarray]:
    """Every value as a float64 numpy array of its shape, in one device→host transfer.

    One `cat` into a float64 buffer: each value is cast to float64 as it is copied (the same exact
    conversion as `.double()` per value, without an op per value: a probe step has ~50 values).
    """
    names = list(values)
    with torch.no_grad():  # (no op per value to detach it)
        parts = [values[n].reshape(-1) for n in names]
        parts = [p if p.device == device else p.to(device) for p in parts]
        flat = torch.empty(sum(p.numel() for p in parts), dtype=torch.float64, device=device)
        flat = torch.cat(parts, out=flat).cpu().numpy()
    row, offset = {}, 0
    for n, p in zip(names, parts):
        row[n] = flat[offset : offset + p.numel()].reshape(tuple(values[n].shape))
        offset += p.numel()
    return row


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Optimizer group names: each group's "name" entry, else its index."""
    return [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]


class ProbeLog:
    """A `ProbeSession` plus the buffer and the store: probe steps of one run, on disk."""

    def __init__(
        self,
        adapter: ModelAdapter,
        probe_batch: torch.Tensor,
        run_dir: str | Path,
        *,
        steps: Iterable[int] | None = None,
        attrs: dict[str, Any] | None = None,
        groups: list[str] | None = None,
        dtype: torch.dtype | None = None,
        lin_batch_size: int | None = LIN_BATCH_SIZE,
        feature_batch_size: int | None = FEATURE_BATCH_SIZE,
        flush_every: int = FLUSH_EVERY,
        flush_seconds: float = FLUSH_SECONDS,
        append: bool = False,
        write: bool | None = None,
        live: str | Iterable[str] | None = None,
        health: bool = True,
        health_every: int = 1,
    ):
        """`steps`: the probe steps (None: every step `update` is called with); `attrs`: stored on the
        records (`param`, `alpha`, `width`, `depth`, `lr`, `seed`, `label`, as `analyses` reads them;
        by default param "sp", depth the adapter's, width the residual stream's, lr the first optimizer
        group's `initial_lr` or `lr` at the first probe step: pass the base LR for a multi-group
        optimizer); `groups`: optimizer group names for `effective_lr` (default: from the first
        optimizer passed to `update`, else "all"); `dtype`: linearization precision (None: float64
        on every device; float32 records values below its measured round-off floor as NaN, flagged in
        `lin_below_floor`: probes/linearization.py); `lin_batch_size`: probe sequences for the linearization error
        (None: all); `feature_batch_size`: the same for the feature change since θ_0; `append`:
        continue an existing store (a resumed run) instead of refusing it; `write`: whether this process
        records (None: rank 0 of torch.distributed, or no process group); `live`: also write per-layer
        summaries as they are measured to "tensorboard" and/or "wandb" (probes.sinks; off by default,
        the store stays the record); `health`: also record the training-health statistics
        (probes.health); `health_every`: all of them only at steps that are multiples of it (NaN in
        between)."""
        if dtype is None:  # float64 on CUDA too: float32 round-off swamps ‖nl‖ at small LR factors
            dtype = torch.float64
        self.session = ProbeSession(adapter, probe_batch, dtype, lin_batch_size=lin_batch_size,
                                    feature_batch_size=feature_batch_size, health=health, health_every=health_every)
        self.path = Path(run_dir) / STORE_NAME
        self.write = is_main_process() if write is None else write
        if self.write and self.path.exists() and not append:
            raise FileExistsError(f"{self.path} already holds probe records; use another directory, remove it, "
                                  "or pass append=True to continue it")
        self.steps = None if steps is None else set(steps)
        self.attrs = {**IDENTITY_DEFAULTS, "depth": adapter.depth, **(attrs or {}),
                      "schema_version": SCHEMA_VERSION, "versions": json.dumps(versions()),
                      "probe_dtype": str(dtype).removeprefix("torch.")}
        check_identity(self.attrs)
        self.groups = groups
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._buffer: list[tuple[int, dict[str, np.ndarray]]] = []
        self._store: RecordStore | None = None
        self._last_flush = time.monotonic()
        self.sinks: list = []
        if live and self.write:  # imported only when asked for, and so are the sink libraries
            from probes.sinks import open_sinks

            self.sinks = open_sinks(live, Path(run_dir), self.attrs)

    def wants(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    @property
    def pending(self) -> int:
        """Probe steps measured but not yet appended to the store."""
        return len(self._buffer)

    @contextlib.contextmanager
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None,
               **scalars: torch.Tensor | float) -> Iterator[None]:
        """Wrap the optimizer step: probes before and after it when `step` is a probe step.

        `scalars` (e.g. train_loss, val_loss) are recorded alongside when the schema declares them.
        """
        if not self.wants(step):
            yield
            return
        self.before_update(step)
        yield
        self.after_update(step, optimizer, **scalars)

    def before_update(self, step: int) -> None:
        self.session.before_update(step)

    def after_update(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                     **scalars: torch.Tensor | float) -> None:
        unknown = sorted(set(scalars) - set(VARIABLES) - set(USER_STATISTICS))
        if unknown:  # fail now, not at the next append
            raise KeyError(f"probe scalars {unknown} are not declared in probes.schema; known scalars include "
                           "train_loss, val_loss")
        values = self.session.after_update(step, optimizer)  # on every rank when sharded: it holds collectives
        if not self.write:
            return
        if optimizer is not None:
            if self.groups is None:
                self.groups = group_names(optimizer)
            if not math.isfinite(self.attrs["lr"]):
                first = optimizer.param_groups[0]
                self.attrs["lr"] = float(first.get("initial_lr", first["lr"]))
            values["effective_lr"] = torch.tensor([float(g["lr"]) for g in optimizer.param_groups])
        host = {}
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                values[name] = value.detach().float().reshape(())
            else:
                host[name] = np.asarray(value, dtype=np.float64)
        row = to_host(values, self.session.batch.device)
        row.update(host)
        self._buffer.append((step, row))
        if self.sinks:
            from probes.sinks import summary_scalars

            scalars = summary_scalars(row)
            for sink in self.sinks:
                sink.write(step, scalars)
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _open_store(self) -> RecordStore:
        if self._store is None:
            if not self.attrs["width"] and self.session.ref0:  # the residual stream's width
                self.attrs["width"] = int(next(iter(self.session.ref0.values())).shape[-1])
            extra = {name: stat.dims for name, stat in USER_STATISTICS.items()}
            coords = coords_for(self.session.adapter.depth, self.groups or ["all"])
            coords.update(health_coords(self.session.adapter))
            if self._buffer and "attn_max_logit" in self._buffer[0][1]:  # heads per layer, as measured
                coords["head"] = list(range(self._buffer[0][1]["attn_max_logit"].shape[1]))
            self._store = RecordStore(self.path, coords, self.attrs, extra)
        return self._store

    def flush(self) -> None:
        """Append the buffered probe steps to the store."""
        if self._buffer:
            steps, rows = zip(*self._buffer)
            self._open_store().append(list(steps), list(rows))
            self._buffer.clear()
        for sink in self.sinks:
            sink.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

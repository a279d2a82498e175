"""Live scalars while a run goes: TensorBoard event files and Weights & Biases, fed from `ProbeLog`.

    log = ProbeLog(adapter, probe_batch, "runs/mine", live="tensorboard")     # or ("tensorboard", "wandb")

Off by default. A sink receives each probe step's row as `ProbeLog` buffers it (host numpy arrays, after
the one device transfer) and writes a few per-layer summaries; the zarr store stays the record, and
nothing here is imported, nor any sink library, unless `live` is set. Scalar names:
    lin_ratio/{attn,mlp}/layer_NN     ‖nl‖/‖lin‖ of each branch (spec §3.5)
    feature_update/layer_NN           RMS of resid_post(t) − resid_post(0)
    stream_rms/layer_NN               RMS of resid_post(t)
    loss/probe, loss/train, loss/val  when recorded
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from probes.schema import BRANCHES, SITES

SINKS = ("tensorboard", "wandb")


def summary_scalars(row: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The live summaries of one probe step's row (variables as in probes.schema), as name → float."""
    out: dict[str, float] = {}
    if "lin_ratio" in row:
        for layer, ratios in enumerate(np.asarray(row["lin_ratio"])):
            for branch, value in zip(BRANCHES, ratios):
                out[f"lin_ratio/{branch}/layer_{layer:02d}"] = float(value)
    post = SITES.index("resid_post")
    for name, key in (("delta0_rms", "feature_update"), ("act_rms", "stream_rms")):
        if name in row:
            for layer, value in enumerate(np.asarray(row[name])[:, post]):
                out[f"{key}/layer_{layer:02d}"] = float(value)
    for name in ("probe_loss", "train_loss", "val_loss"):
        if name in row:
            out[f"loss/{name.removesuffix('_loss')}"] = float(np.asarray(row[name]))
    return out


class Sink(Protocol):
    def write(self, step: int, scalars: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    """Event files under `<run_dir>/tensorboard` (view with `tensorboard --logdir <run_dir>`)."""

    def __init__(self, run_dir: Path, attrs: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError("live='tensorboard' needs the tensorboard package: pip install "
                              "'completep-diagnostics[live]'") from err
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=30)
        self.writer.add_text("run", ", ".join(f"{k}={attrs[k]}" for k in ("param", "alpha", "width", "depth")
                                              if k in attrs))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (its mode follows W&B's own settings, e.g. WANDB_MODE=offline)."""

    def __init__(self, run_dir: Path, attrs: Mapping[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("live='wandb' needs the wandb package: "
                              "pip install 'completep-diagnostics[live]'") from err
        config = {k: v for k, v in attrs.items() if isinstance(v, int | float | str) and k != "versions"}
        self.run = wandb.init(dir=str(run_dir), project="completep-diagnostics", name=Path(run_dir).name,
                              config=config, reinit="create_new")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass  # W&B streams on its own

    def close(self) -> None:
        self.run.finish()


def open_sinks(live: str | Iterable[str] | None, run_dir: Path, attrs: Mapping[str, Any]) -> list[Sink]:
    """The sinks named by `live` ("tensorboard", "wandb", or several); a clear error for another name."""
    names = [] if not live else [live] if isinstance(live, str) else list(live)
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ValueError(f"live={unknown[0]!r} is not a sink; allowed: {', '.join(SINKS)}")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return [(TensorBoardSink if n == "tensorboard" else WandbSink)(Path(run_dir), attrs) for n in names]

"""The training loop: AdamW with the Table 1 groups, schedule, clipping, accumulation, checkpoints.

Run dir (under torchrun, rank 0 writes everything; the other ranks write nothing):
    config.json      the resolved configuration (every section), written before the first step
    metrics.jsonl    one line per step: loss, lr, grad_norm, tokens_per_s (+ val_loss when measured)
    status.json      state (running | finished | failed), last step, message
    checkpoint.pt    the latest good checkpoint (atomic), for --resume
    checkpoint.prev.pt  the one before it: --resume falls back to it when checkpoint.pt is unreadable

Data parallel (`torchrun --nproc-per-node N -m diagnose run ...`): every rank builds the same model
(same seed), DistributedDataParallel averages the gradients, each rank takes its slice of the global
batch of every micro-batch, and the logged loss is all-reduced, so the run matches a 1-process run
with the same global batch within float tolerance. Probes and validation use the unwrapped module.
With `dist="fsdp"` (`--dist fsdp`) FSDP2 shards every parameter, gradient and Adam moment over the
ranks instead; trainer/distributed.py holds both wrappers, the process group and the reductions.

The step itself has no host synchronisation: per-step losses and gradient norms stay on the device
and are transferred once per `log_every` steps, when the non-finite check also runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from trainer import checkpoint as ckpt
from trainer.data import DataConfig, TokenData

# Process groups, the DDP/FSDP2 wrappers and cross-rank reductions live in trainer.distributed; the
# `as` imports re-export the names that callers import from here.
from trainer.distributed import DIST_BACKENDS as DIST_BACKENDS
from trainer.distributed import (
    DIST_MODES,
    clip_grad_norm,
    dist_info,
    full_state_dicts,
    is_sharded,
    load_full_state_dicts,
    local_cuda_index,
    wrap_model,
)
from trainer.distributed import broadcast_from_main as broadcast_from_main
from trainer.distributed import distributed as distributed
from trainer.distributed import env_rank_world as env_rank_world
from trainer.errors import ConfigError
from trainer.model import GPT, ModelConfig, unwrap
from trainer.observers import Observer
from trainer.optim import SCHEDULES, build_optimizer, group_summary, lr_factor, set_lr
from trainer.parameterization import Parameterization
from trainer.spikes import SpikeDetector

METRICS_NAME, STATUS_NAME, CONFIG_NAME = "metrics.jsonl", "status.json", "config.json"
CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng", "last_val_loss", "observers")
DTYPES = ("auto", "float32", "bfloat16")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm at `step` (named in the message)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite training loss or gradient norm at step {step}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400  # optimizer updates
    batch_size: int = 16  # sequences per update, over all ranks and accumulation steps
    grad_accum: int = 1  # micro-batches per update (per rank)
    warmup_frac: float = 0.1  # share of steps with linear warmup
    schedule: str = "linear"  # linear (to zero) | cosine | constant, after warmup
    min_lr_frac: float = 0.0  # floor of the decay, as a fraction of the peak LR
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # steps between validation losses (and at the end)
    eval_batches: int = 4  # held-out batches per validation
    eval_batch_size: int = 16  # sequences per validation batch (fixed, so val losses compare across runs)
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    log_every: int = 10  # steps between host transfers of the loss (and the NaN check)
    seed: int = 0  # init and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the training forward (CUDA recommended)
    dist: str = "ddp"  # under torchrun: ddp (whole model per rank) | fsdp (FSDP2, parameters sharded)
    # Also keep every K-th step's checkpoint as checkpoints/step_<S>.pt (0: only the latest), so that
    # `diagnose replay` can restart shortly before a spike. A multiple of checkpoint_every.
    keep_checkpoints_every: int = 0
    # Debug/test hook: multiply the learning rate of update `debug_lr_spike_step` by
    # `debug_lr_spike_factor` (a loss spike on purpose, at a known step; -1: off).
    debug_lr_spike_step: int = -1
    debug_lr_spike_factor: float = 1.0


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; stored as config.json."""

    param: Parameterization = field(default_factory=Parameterization)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"param": asdict(self.param), "model": asdict(self.model), "data": asdict(self.data),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(Parameterization(**d["param"]), ModelConfig(**d["model"]), DataConfig(**d["data"]),
                   TrainConfig(**d["train"]))


def validate_train(cfg: TrainConfig, world: int = 1) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "eval_batch_size",
                 "checkpoint_every", "log_every"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if cfg.batch_size % (cfg.grad_accum * world):
        why = f": each of the {world} processes takes an equal share of every micro-batch" if world > 1 else ""
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by grad_accum × world size = "
            f"{cfg.grad_accum} × {world}{why}"
        )
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule={cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 <= cfg.warmup_frac < 1:
        raise ConfigError(f"warmup_frac={cfg.warmup_frac} must be in [0, 1)")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device={cfg.device!r} must be auto, cpu, cuda or cuda:N")
    if not isinstance(cfg.keep_checkpoints_every, int) or cfg.keep_checkpoints_every < 0 \
            or cfg.keep_checkpoints_every % cfg.checkpoint_every:
        raise ConfigError(f"keep_checkpoints_every={cfg.keep_checkpoints_every!r} must be 0 or a positive multiple "
                          f"of checkpoint_every={cfg.checkpoint_every}")
    if not (cfg.debug_lr_spike_factor > 0 and math.isfinite(cfg.debug_lr_spike_factor)):
        raise ConfigError(f"debug_lr_spike_factor={cfg.debug_lr_spike_factor!r} must be a positive finite number")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} requested but CUDA is not available on this machine")
    if cfg.dist not in DIST_MODES:
        raise ConfigError(f"dist={cfg.dist!r} is not one of {', '.join(DIST_MODES)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """One training run in one run dir. `run()` trains to `train.steps`, resuming if asked."""

    def __init__(self, spec: RunSpec, run_dir: Path, observers: list[Observer] | None = None,
                 extra_config: dict[str, Any] | None = None, quiet: bool = False):
        self.spec, self.run_dir = spec, Path(run_dir)
        self.observers = list(observers or [])
        self.extra_config = extra_config or {}
        self.quiet = quiet
        self.rank, self.world = dist_info()
        validate_train(spec.train, self.world)
        self.device = resolve_device(spec.train.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_cuda_index())
        if self.world > 1 and dist.get_backend() == "nccl" and self.device.type != "cuda":
            raise ConfigError(f"the nccl backend needs CUDA tensors, but device={spec.train.device!r}; "
                              "use --dist-backend gloo for CPU training")
        self.data = TokenData(spec.data, spec.model.seq_len)
        torch.manual_seed(spec.train.seed)
        self.model: GPT = GPT(spec.param, spec.model).to(self.device)
        self.roles = self.model.parameter_roles()
        # DDP, or FSDP2 sharding in place (then the optimizer groups hold the sharded parameters).
        self.train_model, self.ddp_model = wrap_model(self.model, spec.train.dist, self.device, self.world,
                                                      bf16_compute=self.device.type == "cuda" and self._bf16)
        # Fused AdamW on every device: on CPU too it is one kernel per group instead of a dozen foreach
        # calls (optimizer step 0.9 → 0.3 ms at width 64, depth 2; the same AdamW to float32 round-off,
        # tests/trainer/test_optim_foreach.py; benchmarks/RESULTS.md, "Small shapes, after").
        self.optimizer = build_optimizer(self.model, spec.param, self.roles,
                                         betas=(spec.train.beta1, spec.train.beta2), fused=True)
        if spec.train.compile:
            self.train_model = torch.compile(self.train_model)
        self.step = 0  # the next update to run
        self.last_loss: torch.Tensor | None = None  # this step's loss, on the device
        self.last_val_loss = math.nan
        self._pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
        self._timer = (time.perf_counter(), 0)
        self.spikes = SpikeDetector()  # marks loss/grad-norm spikes in metrics.jsonl (trainer/spikes.py)
        # Wall-clock (time.time(), s) at the run's phases: built, loop_start, loop_end (the loop that
        # metrics.jsonl times), validated, saved (final validation and checkpoint), closed. Sweeps read
        # it to show where time goes outside the runs' training loops.
        self.timeline: dict[str, float] = {"built": time.time()}

    # --- helpers -----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def eager_model(self) -> GPT:
        """The module behind any compile/DDP wrapper: what probes use."""
        return unwrap(self.train_model)

    @property
    def _bf16(self) -> bool:
        dtype = self.spec.train.dtype
        return dtype == "bfloat16" or (dtype == "auto" and self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self._bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, msg: str) -> None:
        if self.is_main and not self.quiet:
            tqdm.write(msg)

    def _write_status(self, state: str, message: str = "", **extra: Any) -> None:
        """status.json: state, `step` = updates completed so far, target steps, message (+ extra keys)."""
        if self.is_main:
            status = {"state": state, "step": self.step, "steps": self.spec.train.steps, "message": message,
                      **extra}
            tmp = self.run_dir / f".{STATUS_NAME}.tmp"
            tmp.write_text(json.dumps(status))
            os.replace(tmp, self.run_dir / STATUS_NAME)

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        for obs in self.observers:
            obs.flush()
        model_state, optim_state = full_state_dicts(self.model, self.optimizer)  # gathers shards (all ranks)
        if not self.is_main:
            return
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "step": self.step,
            "rng": ckpt.rng_state(),
            "last_val_loss": self.last_val_loss,
            "observers": {o.name: o.state_dict() for o in self.observers},
        }
        ckpt.save_keeping_previous(state, self.run_dir / ckpt.CHECKPOINT_NAME)
        keep = self.spec.train.keep_checkpoints_every
        if keep and self.step % keep == 0:
            # The bytes just written, not a second serialization of the same state.
            ckpt.keep_copy(self.run_dir / ckpt.CHECKPOINT_NAME, ckpt.kept_path(self.run_dir, self.step))

    def load_checkpoint(self) -> None:
        # Sharded: the full tensors stay on the CPU; each rank copies only its own shards to the device.
        where = "cpu" if is_sharded(self.model) else self.device
        state, path, problems = ckpt.load_latest(self.run_dir, where, required=CHECKPOINT_KEYS)
        try:
            load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # readable, but another model's checkpoint
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ckpt.CheckpointError(f"cannot resume: {path} does not fit this run's model ({first})") from None
        if problems and self.is_main:  # said whatever --quiet asks: the run goes back to an earlier step
            ckpt.promote_previous(self.run_dir)
            tqdm.write(f"warning: {'; '.join(problems)}; resuming from {path} (step {int(state['step'])}); "
                       f"the unreadable file is kept as {ckpt.DAMAGED_NAME}", file=sys.stderr)
        ckpt.set_rng_state({k: v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v]
                            for k, v in state["rng"].items()})
        self.step = int(state["step"])
        self.last_val_loss = float(state["last_val_loss"])
        for obs in self.observers:
            obs.load_state_dict(state["observers"].get(obs.name, {}))
            if self.is_main:  # observers record on rank 0 only; other ranks must not touch its files
                obs.resume(self.step)
        if self.is_main:
            truncate_metrics(self.run_dir / METRICS_NAME, self.step)
        self.spikes = SpikeDetector()  # the same history as the first run had at this step
        for record in read_metrics(self.run_dir / METRICS_NAME):
            if "loss" in record and record["step"] < self.step:
                self.spikes.observe(record)

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        model = self.eager_model
        model.eval()
        cfg = self.spec.train
        losses = []
        for batch in self.data.val_batches(cfg.eval_batches, cfg.eval_batch_size):
            batch = batch.to(self.device)
            with self.autocast():
                losses.append(model(batch[:, :-1], batch[:, 1:]))
        model.train()
        return torch.stack(losses).mean().item()

    # --- the step ------------------------------------------------------------------------------------
    def train_step(self, step: int) -> None:
        cfg = self.spec.train
        factor = lr_factor(step, cfg.steps, round(cfg.warmup_frac * cfg.steps), cfg.schedule, cfg.min_lr_frac)
        if step == cfg.debug_lr_spike_step:
            factor *= cfg.debug_lr_spike_factor
        set_lr(self.optimizer, factor)
        batch = self.data.train_batch(cfg.seed, step, cfg.batch_size, self.rank, self.world)
        batch = batch.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch.chunk(cfg.grad_accum)):
            last = i == cfg.grad_accum - 1
            # DDP all-reduces gradients only on the last micro-batch of the update.
            sync = contextlib.nullcontext() if last or self.ddp_model is None else self.ddp_model.no_sync()
            with sync:  # one context for forward and backward (no_sync is a one-shot generator)
                with self.autocast():
                    loss = self.train_model(micro[:, :-1], micro[:, 1:]) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if self.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.grad_clip)  # the global norm, also when sharded
        self.last_loss = loss_sum
        watching = [o for o in self.observers if o.wants(step)]
        for obs in watching:
            obs.before_update(step, self)
        self.optimizer.step()
        for obs in watching:
            obs.after_update(step, self)
        self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((step, factor, loss_sum, grad_norm.detach()))

    def flush_metrics(self) -> None:
        """One host transfer for the buffered steps; write their lines; raise on a non-finite loss."""
        if not self._pending:
            return
        values = torch.stack([torch.stack([l.float(), g.float()]) for _, _, l, g in self._pending]).cpu()
        t0, n0 = self._timer
        now = time.perf_counter()
        tokens = len(self._pending) * self.spec.train.batch_size * self.spec.model.seq_len
        tps = tokens / max(now - t0, 1e-9)
        self._timer = (now, n0 + len(self._pending))
        lines, bad = [], None
        lr0 = self.spec.param.lr_base
        for (step, factor, _, _), (loss, gnorm) in zip(self._pending, values.tolist()):
            # A finite loss with a non-finite gradient would still poison the parameters (and the next
            # checkpoint) through the optimizer step, so both count.
            if bad is None and not (math.isfinite(loss) and math.isfinite(gnorm)):
                bad = step
            record = {"step": step, "loss": loss, "lr": lr0 * factor, "grad_norm": gnorm, "tokens_per_s": tps}
            spiked = self.spikes.observe(record)
            if spiked:
                record.update(spike=sorted(spiked), spike_z={k: round(v, 2) for k, v in spiked.items()})
            lines.append(json.dumps(record))
        self._pending.clear()
        if self.is_main:
            with open(self.run_dir / METRICS_NAME, "a") as f:
                f.write("\n".join(lines) + "\n")
        if bad is not None:
            raise NonFiniteLoss(bad)

    def _record_validation(self, step: int) -> None:
        self.last_val_loss = self.validate()
        for obs in self.observers:
            obs.on_validation(step, self.last_val_loss)
        if self.is_main:
            with open(self.run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": self.last_val_loss}) + "\n")
        self.log(f"step {step:>6}  val_loss {self.last_val_loss:.4f}")

    # --- the run -------------------------------------------------------------------------------------
    def run(self, resume: bool = False, until: int | None = None) -> dict[str, Any]:
        """Train to the configured number of steps (or stop before update `until`). Returns the final metrics.

        `until` leaves the schedule as configured (it depends on the total steps); `diagnose replay`
        uses it to re-run a stretch of a run."""
        cfg = self.spec.train
        stop = cfg.steps if until is None else min(until, cfg.steps)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
            self.log(f"resumed {self.run_dir} at step {self.step}")
        elif self.is_main:
            config = {**self.spec.to_dict(), **self.extra_config}
            (self.run_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            (self.run_dir / METRICS_NAME).write_text("")
        self.log(f"{self.spec.param.label}: width {self.spec.param.width}, depth {self.spec.param.depth}, "
                 f"{self.model.num_params():,} non-embedding params, device {self.device}")
        for line in group_summary(self.optimizer):
            self.log("  " + line)
        self._write_status("running")
        self._timer = (time.perf_counter(), 0)
        self.timeline["loop_start"] = time.time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.quiet or not self.is_main)
        try:
            while self.step < stop:
                step = self.step
                if step % cfg.eval_every == 0:
                    self._record_validation(step)
                self.train_step(step)
                self.step = step + 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.flush_metrics()
                    bar.set_postfix(loss=f"{self.last_loss.item():.4f}", refresh=False)
                    bar.update(cfg.log_every if self.step % cfg.log_every == 0 else self.step - bar.n)
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.flush_metrics()
                    self.save_checkpoint()
            self.flush_metrics()
            self.timeline["loop_end"] = time.time()
            self._record_validation(self.step)
            self.timeline["validated"] = time.time()
            self.save_checkpoint()
            self.timeline["saved"] = time.time()
        except NonFiniteLoss as err:
            self._write_status("failed", str(err), bad_step=err.step)
            raise
        except BaseException as err:  # a crash or an interrupt: say so; the checkpoint allows --resume
            self._write_status("failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            bar.close()
            for obs in self.observers:
                obs.close()
            self.timeline["closed"] = time.time()
        self._write_status("finished", "" if self.step == cfg.steps else f"stopped before update {stop} (until)")
        if self.world > 1:
            dist.barrier()  # every rank leaves once rank 0 has written the final checkpoint and status
        return {"step": self.step, "val_loss": self.last_val_loss}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines at or after `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if record["step"] < step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)

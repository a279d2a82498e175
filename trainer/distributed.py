"""Everything that depends on how one model is spread over processes, in one place.

- the process group: `init_distributed` / `distributed` join torchrun's group (NCCL on CUDA, gloo on
  CPU); `broadcast_from_main` shares rank 0's decisions;
- the wrapper: `wrap_model` applies DistributedDataParallel (`ddp`: every rank holds the whole model
  and its optimizer state) or FSDP2 (`fsdp`: `fully_shard` on every transformer block, then on the
  root, so every rank holds 1/world of each parameter, gradient and Adam moment as a DTensor shard);
- what the loop and the probes need without knowing which wrapper is in use:
  `clip_grad_norm` (the global norm, also over shards), `full_state_dicts` / `load_full_state_dicts`
  (checkpoints), `full_parameters` ("the whole tensors of this branch"), `squared_norms` and
  `sum_across_ranks` ("reduce this statistic"), `probes_on_every_rank` and `my_share`.

Sharded or not is read off the parameters themselves (DTensor or plain), so a user's own FSDP2 loop
gets the same behaviour as the toolkit's trainer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError

DIST_BACKENDS = ("auto", "gloo", "nccl")
DIST_MODES = ("ddp", "fsdp")  # how several processes share one model (see the module docstring)


# --- the process group -------------------------------------------------------------------------------
def env_rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun announces them in the environment, before any process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_cuda_index() -> int:
    """This process's GPU: LOCAL_RANK, wrapped if the launcher already restricted the visible devices."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    return local % count if count else local


def resolve_backend(backend: str = "auto", device: str = "auto") -> str:
    """gloo or nccl for `backend` (auto | gloo | nccl) and the run's device; ConfigError if impossible."""
    if backend not in DIST_BACKENDS:
        raise ConfigError(f"dist backend {backend!r} is not one of {', '.join(DIST_BACKENDS)}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("--dist-backend nccl needs CUDA, which is not available on this machine; "
                              "use --dist-backend gloo (or auto) to train on CPU")
        if device == "cpu":
            raise ConfigError("--dist-backend nccl cannot reduce CPU tensors (--device cpu); use --dist-backend gloo")
        return "nccl"
    if backend == "gloo":
        return "gloo"
    return "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"


def init_distributed(backend: str = "auto", device: str = "auto") -> tuple[int, int]:
    """Join the torchrun process group (if WORLD_SIZE > 1 and not joined yet); returns (rank, world)."""
    resolved = resolve_backend(backend, device)
    _, world = env_rank_world()
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if var not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world} is set but {var} is not: launch with torchrun "
                                  "(torchrun --nproc-per-node N -m diagnose run ...)")
        if resolved == "nccl":
            torch.cuda.set_device(local_cuda_index())
        dist.init_process_group(resolved)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed(backend: str = "auto", device: str = "auto"):
    """`init_distributed` for the duration of the block; destroys the process group it created."""
    created = not dist.is_initialized()
    rank_world = init_distributed(backend, device)
    try:
        yield rank_world
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dist_info() -> tuple[int, int]:
    """(rank, world size), initializing the process group (backend auto) under torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return init_distributed()


def is_main_process() -> bool:
    """Rank 0 of the default group, or no group at all: the process that writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def ensure_process_group(device: torch.device) -> None:
    """A process group of one when none exists (FSDP2 needs a device mesh, even on one process).

    It lives until the process exits: the sharded parameters keep referring to it.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# --- the wrapper --------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, mode: str, device: torch.device, world: int,
               bf16_compute: bool = False) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """(module to train, the DDP wrapper or None). Build the optimizer *after* this under `fsdp`.

    `ddp` wraps only when world > 1 (DDP broadcasts rank 0's parameters; every rank seeded the same
    anyway). `fsdp` shards in place, also on one process: `fully_shard` on each block, then on the
    root (embeddings, final norm, unembedding), so a forward all-gathers one block at a time and
    frees it after use. `bf16_compute` (CUDA): bf16 parameters in forward/backward, gradients
    reduced in fp32, fp32 sharded master weights (MixedPrecisionPolicy).
    """
    if mode not in DIST_MODES:
        raise ConfigError(f"dist={mode!r} is not one of {', '.join(DIST_MODES)}")
    if mode == "ddp":
        if world == 1:
            return model, None
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return ddp, ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, None


def is_sharded(model: nn.Module) -> bool:
    """Whether the parameters are DTensor shards (FSDP2) rather than whole tensors on every rank."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (0-d, on the device); scale them to `max_norm` if > 0.

    For DTensor gradients the per-shard norms are combined across ranks (`full_tensor`), so the
    norm and the clipping factor are those of the whole model, identical on every rank.
    """
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):  # plain tensors: the loop's original code
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# --- checkpoints --------------------------------------------------------------------------------------
def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the whole model, for a checkpoint written by rank 0.

    Sharded: a collective that every rank must call; rank 0 receives the gathered full tensors on the
    CPU, the others empty dicts. Optimizer state is then keyed by parameter name, not by index.
    """
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict) -> None:
    """Inverse of `full_state_dicts`: every rank passes the full dicts and keeps its own shards."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


# --- what the probes ask --------------------------------------------------------------------------------
def probes_on_every_rank(model: nn.Module) -> bool:
    """Sharded: a forward is a collective, so every rank takes part in a probe step (rank 0 records).
    Otherwise probes run on rank 0 alone, on its whole copy of the model."""
    return is_sharded(model)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_parameters(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors for `params` (name → tensor): DTensor shards are all-gathered (a collective: every
    rank calls it with the same names), plain tensors pass through. Ask for one branch at a time, so
    that the extra memory is one branch's parameters."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in params.items()}


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σx² of every tensor (a float32 vector, one entry per tensor), whole-tensor values on every rank.

    DTensor shards contribute their local sums, added across ranks in one all-reduce; plain tensors
    (the same on every rank) are counted once, not world times.
    """
    sq = torch.stack(torch._foreach_norm([local_part(t).float() for t in tensors])).pow(2)
    sharded = [isinstance(t, DTensor) for t in tensors]
    if not any(sharded):
        return sq
    mask = torch.tensor(sharded, device=sq.device)
    shard_sums = sum_across_ranks(torch.where(mask, sq, 0.0))
    return torch.where(mask, shard_sums, sq)


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `t` (one all-reduce; itself without a process group of more than one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def my_share(costs: list[float], model: nn.Module) -> set[int]:
    """Indices of the work items (with these costs) that this rank computes.

    All of them unless the probes run on every rank; then each item goes, largest first, to the rank
    with the least work so far (lowest rank on ties): the same split on every rank, no communication.
    """
    if not probes_on_every_rank(model) or not dist.is_initialized() or dist.get_world_size() == 1:
        return set(range(len(costs)))
    load = [0.0] * dist.get_world_size()
    mine = set()
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        load[rank] += costs[i]
        if rank == dist.get_rank():
            mine.add(i)
    return mine

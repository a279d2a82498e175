"""Statistics as a registry: name → function of one probe step's measurements.

Every built-in variable of `probes.schema` is computed here from a `ProbeContext`; a user adds their
own in one line:

    @register_statistic("attn_add_abs_max", dims=("layer",))
    def attn_add_abs_max(ctx):
        return torch.stack([ctx.acts[(l, "attn_add")].abs().max() for l in range(ctx.depth)])

A statistic returns a tensor on the device whose shape matches its dims (layer: depth, site: the
schema's sites, branch: attn/mlp); the recorder moves all of them to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from probes.linearization import LinearizationResult, result_table
from probes.schema import BLOCK_ROLES, BRANCHES, EMBED_SITE, FINAL_SITE, GLOBAL_ROLES, SITES
from trainer.distributed import squared_norms


@dataclass
class ProbeContext:
    """One probe step's raw measurements, all on the device."""

    step: int
    depth: int
    acts: dict[tuple[int, str], torch.Tensor]  # (layer, site) → h(t); layer −1: embed / final_stream
    ref0: dict[tuple[int, str], torch.Tensor]  # the same at step 0
    prev: dict[tuple[int, str], torch.Tensor] | None  # the same at the previous probe step
    grads: list[torch.Tensor]  # dLoss/d resid_pre per layer
    probe_loss: torch.Tensor
    linearization: dict[tuple[int, str], LinearizationResult]
    params_before: dict[str, torch.Tensor]
    params_after: dict[str, torch.Tensor]
    roles: dict[str, str]
    layers: dict[str, int | None]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # the stream site each branch reads (a parallel-residual MLP reads resid_pre, not resid_mid)
    branch_inputs: dict[str, str] = field(default_factory=lambda: {"attn": "resid_pre", "mlp": "resid_mid"})
    # For the training-health statistics (probes.health): the adapter, the optimizer whose state they
    # read, the probe batch, and state a statistic keeps between probe steps (e.g. warm starts).
    adapter: Any = None
    optimizer: Any = None
    batch: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Statistic:
    fn: Callable[[ProbeContext], torch.Tensor]
    dims: tuple[str, ...]
    units: str = ""
    description: str = ""


USER_STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str, dims: tuple[str, ...] = (), units: str = "", description: str = ""):
    """Decorator: record `fn(ctx)` under `name` at every probe step (dims after `step`)."""

    def decorator(fn: Callable[[ProbeContext], torch.Tensor]) -> Callable[[ProbeContext], torch.Tensor]:
        USER_STATISTICS[name] = Statistic(fn, tuple(dims), units, description or (fn.__doc__ or "").strip())
        return fn

    return decorator


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean().sqrt()


def _delta_rms(ctx: ProbeContext, ref: dict | None) -> torch.Tensor:
    if ref is None:
        return torch.full((ctx.depth, len(SITES)), float("nan"), device=ctx.probe_loss.device)
    return torch.stack([torch.stack([rms(ctx.acts[(l, s)] - ref[(l, s)]) for s in SITES]) for l in range(ctx.depth)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()


def _update_norms(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """‖ΔW‖/‖W‖ and RMS(ΔW) per (layer, block role) and per global role, from squared norms."""
    names = list(ctx.params_before)
    before = [ctx.params_before[n].float() for n in names]
    delta = torch._foreach_sub([ctx.params_after[n].float() for n in names], before)  # one call, same kernel
    # Σx² per tensor; FSDP2 shards (DTensors) add up across ranks in one all-reduce.
    d2, w2 = squared_norms([*delta, *before]).split(len(names))
    device = d2.device
    numel = torch.tensor([float(b.numel()) for b in before], device=device)  # a DTensor's numel is global
    # Scatter tensors into (layer, role) cells: one index per tensor, built on the host.
    n_block = ctx.depth * len(BLOCK_ROLES)
    index = []
    for n in names:
        role, layer = ctx.roles[n], ctx.layers[n]
        if layer is not None and role in BLOCK_ROLES:
            index.append(layer * len(BLOCK_ROLES) + BLOCK_ROLES.index(role))
        elif role in GLOBAL_ROLES:
            index.append(n_block + GLOBAL_ROLES.index(role))
        else:
            index.append(n_block + len(GLOBAL_ROLES))  # a dump cell for roles we do not report
    idx = torch.tensor(index, device=device)
    cells = n_block + len(GLOBAL_ROLES) + 1
    sums = [torch.zeros(cells, device=device).index_add_(0, idx, v) for v in (d2, w2, numel)]
    d2c, w2c, nc = sums
    empty = nc == 0
    rel = (d2c / w2c).sqrt().masked_fill(empty, float("nan"))
    urms = (d2c / nc).sqrt().masked_fill(empty, float("nan"))
    return {
        "update_rel": rel[:n_block].view(ctx.depth, len(BLOCK_ROLES)),
        "update_rms": urms[:n_block].view(ctx.depth, len(BLOCK_ROLES)),
        "global_update_rel": rel[n_block:-1],
        "global_update_rms": urms[n_block:-1],
    }


def builtin_statistics(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Every variable of probes.schema except the losses and effective LRs (the recorder adds those)."""
    L, acts, ref0 = ctx.depth, ctx.acts, ctx.ref0
    out: dict[str, torch.Tensor] = {
        "act_rms": torch.stack([torch.stack([rms(acts[(l, s)]) for s in SITES]) for l in range(L)]),
        "delta0_rms": _delta_rms(ctx, ref0),
        "delta_prev_rms": _delta_rms(ctx, ctx.prev),
    }
    lin = result_table(ctx.linearization, L, BRANCHES)  # (layer, branch) tensors, one stack
    for name in ("branch_norm", "lin_norm", "nonlin_norm", "lin_ratio", "nonlin_to_output"):
        out[name] = getattr(lin, name).float()
    # The round-off guard of a float32 linearization (NaN floor and 0 in float64).
    out["nonlin_floor"] = lin.nonlin_floor.float()
    out["lin_below_floor"] = lin.below_floor.float()
    # RMS(branch addition) / RMS(branch input): the entries of act_rms (the same RMS of the same tensors).
    adds = [SITES.index(f"{b}_add") for b in BRANCHES]
    inputs = [SITES.index(ctx.branch_inputs[b]) for b in BRANCHES]
    out["branch_to_stream"] = out["act_rms"][:, adds] / out["act_rms"][:, inputs]
    out["stream_cosine"] = torch.stack([_cosine(acts[(l, "resid_pre")], acts[(l, "resid_post")]) for l in range(L)])
    # Each layer's share of the change of the final stream since step 0 (projection onto Δh_final).
    final_delta = (acts[(-1, FINAL_SITE)] - ref0[(-1, FINAL_SITE)]).float()
    denom = final_delta.pow(2).sum()
    shares = []
    for l in range(L):
        layer_delta = sum((acts[(l, s)] - ref0[(l, s)]).float() for s in ("attn_add", "mlp_add"))
        shares.append((layer_delta * final_delta).sum() / denom)
    out["final_update_share"] = torch.stack(shares)
    embed_delta = (acts[(-1, EMBED_SITE)] - ref0[(-1, EMBED_SITE)]).float()
    out["embed_update_share"] = (embed_delta * final_delta).sum() / denom
    out["grad_rms"] = torch.stack([rms(g) for g in ctx.grads])
    final = acts[(-1, FINAL_SITE)].float()
    out["final_rms"] = rms(final)
    out["final_abs_mean"] = final.abs().mean()
    out["final_delta0_rms"] = rms(final_delta)
    out.update(_update_norms(ctx))
    return out

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

import torch

from probes.linearization import LinearizationResult
from probes.schema import BLOCK_ROLES, BRANCHES, EMBED_SITE, FINAL_SITE, GLOBAL_ROLES, SITES


def site_keys(depth: int) -> list[tuple[int, str]]:
    """Row order of stacked site activations: every block site layer by layer, then embed and final."""
    return [(l, s) for l in range(depth) for s in SITES] + [(-1, EMBED_SITE), (-1, FINAL_SITE)]


def stack_sites(acts: dict[tuple[int, str], torch.Tensor], depth: int) -> torch.Tensor:
    """All site activations in one float32 tensor (sites, *shape), rows in `site_keys` order.

    Every site is a residual-stream-shaped tensor, so one stack holds them, and the statistics
    reduce all sites in a few kernels instead of a few per site.
    """
    return torch.stack([acts[k].detach() for k in site_keys(depth)]).float()


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
    # acts / ref0 / prev stacked by `stack_sites` (the session passes the tensors its dicts are views
    # of); built from the dicts when left None.
    acts_stack: torch.Tensor | None = None
    ref0_stack: torch.Tensor | None = None
    prev_stack: torch.Tensor | None = None

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(acts, ref0, prev) as `stack_sites` tensors; prev is None before the second probe step."""
        if self.acts_stack is None:
            self.acts_stack = stack_sites(self.acts, self.depth)
        if self.ref0_stack is None:
            self.ref0_stack = stack_sites(self.ref0, self.depth)
        if self.prev_stack is None and self.prev is not None:
            self.prev_stack = stack_sites(self.prev, self.depth)
        return self.acts_stack, self.ref0_stack, self.prev_stack


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


def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of each row of (rows, ...): the `rms` of every site at once."""
    return x.flatten(1).pow(2).mean(1).sqrt()


def _update_index(names: tuple[str, ...], roles: tuple[str, ...], layers: tuple[int | None, ...],
                  depth: int) -> list[int]:
    """Cell of each parameter tensor: (layer, block role), a global role, or the dump cell after them."""
    n_block = depth * len(BLOCK_ROLES)
    index = []
    for role, layer in zip(roles, layers):
        if layer is not None and role in BLOCK_ROLES:
            index.append(layer * len(BLOCK_ROLES) + BLOCK_ROLES.index(role))
        elif role in GLOBAL_ROLES:
            index.append(n_block + GLOBAL_ROLES.index(role))
        else:
            index.append(n_block + len(GLOBAL_ROLES))  # roles we do not report
    return index


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _update_norms(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """‖ΔW‖/‖W‖ and RMS(ΔW) per (layer, block role) and per global role, from squared norms."""
    names = tuple(ctx.params_before)
    before = [ctx.params_before[n].float() for n in names]
    delta = torch._foreach_sub([ctx.params_after[n].float() for n in names], before)
    d2 = torch.stack(torch._foreach_norm(delta)).pow(2)
    w2 = torch.stack(torch._foreach_norm(before)).pow(2)
    device = d2.device
    # The scatter index and element counts depend only on the model: built on the host once.
    key = (names, ctx.depth, str(device))
    if key not in _INDEX_CACHE:
        index = _update_index(names, tuple(ctx.roles[n] for n in names), tuple(ctx.layers[n] for n in names),
                              ctx.depth)
        _INDEX_CACHE.clear()  # one model at a time; keep the cache from growing over many runs
        _INDEX_CACHE[key] = (torch.tensor(index, device=device),
                             torch.tensor([float(b.numel()) for b in before], device=device))
    idx, numel = _INDEX_CACHE[key]
    n_block = ctx.depth * len(BLOCK_ROLES)
    cells = n_block + len(GLOBAL_ROLES) + 1
    d2c, w2c, nc = (torch.zeros(cells, device=device).index_add_(0, idx, v) for v in (d2, w2, numel))
    empty = nc == 0
    rel = (d2c / w2c).sqrt().masked_fill(empty, float("nan"))
    urms = (d2c / nc).sqrt().masked_fill(empty, float("nan"))
    return {
        "update_rel": rel[:n_block].view(ctx.depth, len(BLOCK_ROLES)),
        "update_rms": urms[:n_block].view(ctx.depth, len(BLOCK_ROLES)),
        "global_update_rel": rel[n_block:-1],
        "global_update_rms": urms[n_block:-1],
    }


def _linearization_stats(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """The five (layer, branch) linearization variables from one stack of the 3·2L norms."""
    L = ctx.depth
    norms = torch.stack([
        x for l in range(L) for b in BRANCHES
        for x in (ctx.linearization[(l, b)].branch_norm, ctx.linearization[(l, b)].lin_norm,
                  ctx.linearization[(l, b)].nonlin_norm)
    ]).view(L, len(BRANCHES), 3)
    branch, lin, nonlin = norms.unbind(-1)
    # Ratios in the linearization's precision, then float32 (as LinearizationResult's properties).
    return {"branch_norm": branch.float(), "lin_norm": lin.float(), "nonlin_norm": nonlin.float(),
            "lin_ratio": (nonlin / lin).float(), "nonlin_to_output": (nonlin / branch).float()}


def builtin_statistics(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Every variable of probes.schema except the losses and effective LRs (the recorder adds those).

    Site statistics reduce the stacked activations (one row per site, `site_keys` order), so their
    cost does not grow with Python calls per site and layer.
    """
    L, S = ctx.depth, len(SITES)
    n_block = L * S
    embed, final = n_block, n_block + 1  # rows after the block sites (see site_keys)
    acts, ref0, prev = ctx.stacks()
    act_rms = _row_rms(acts)
    delta0 = acts - ref0
    delta0_rms = _row_rms(delta0)
    out: dict[str, torch.Tensor] = {
        "act_rms": act_rms[:n_block].view(L, S),
        "delta0_rms": delta0_rms[:n_block].view(L, S),
        "delta_prev_rms": (torch.full((L, S), float("nan"), device=acts.device) if prev is None
                           else _row_rms(acts[:n_block] - prev[:n_block]).view(L, S)),
    }
    out.update(_linearization_stats(ctx))
    # (layer, site) views of the block rows: site s of every layer at once.
    site = {name: i for i, name in enumerate(SITES)}
    blocks, blocks_delta0 = acts[:n_block].unflatten(0, (L, S)), delta0[:n_block].unflatten(0, (L, S))
    rms = out["act_rms"]
    out["branch_to_stream"] = torch.stack([rms[:, site["attn_add"]] / rms[:, site["resid_pre"]],
                                           rms[:, site["mlp_add"]] / rms[:, site["resid_mid"]]], dim=1)
    out["stream_cosine"] = torch.nn.functional.cosine_similarity(
        blocks[:, site["resid_pre"]], blocks[:, site["resid_post"]], dim=-1).flatten(1).mean(1)
    # Each layer's share of the change of the final stream since step 0 (projection onto Δh_final).
    final_delta = delta0[final].flatten()
    denom = final_delta.pow(2).sum()
    layer_delta = (blocks_delta0[:, site["attn_add"]] + blocks_delta0[:, site["mlp_add"]]).flatten(1)
    out["final_update_share"] = (layer_delta * final_delta).sum(1) / denom
    out["embed_update_share"] = (delta0[embed].flatten() * final_delta).sum() / denom
    out["grad_rms"] = _row_rms(torch.stack(ctx.grads).float())
    out["final_rms"] = act_rms[final]
    out["final_abs_mean"] = acts[final].abs().mean()
    out["final_delta0_rms"] = delta0_rms[final]
    out.update(_update_norms(ctx))
    return out

"""Training-health statistics: attention logits and entropy, activation outliers, Adam state, spectra.

The failures practitioners debug in deep training are instabilities, and each has a signal here,
computed at every probe step from the same `ProbeContext` as the built-in statistics, reduced on the
device and moved to the host with them in the one transfer per probe step:

- attention (per layer and head): the largest pre-softmax logit (after the attention scale) and the
  mean entropy of the attention pattern, also divided by log(context length), on the probe batch.
  The built-in GPT exposes `attn_logits` / `attn_probs` hook sites on its math attention path only;
  the probes replay each block's own attention branch (`adapter.branch(layer, "attn")`) on the
  activation captured at its input site, under the math path. A Hugging Face model is measured
  through the transformers attention-function registry (`probes.hf_attention`) in one extra
  no-grad forward of the probe batch.
- activations (per layer and site of `adapter.sites()`): abs-max, kurtosis E[(x-µ)⁴]/Var² (3 for a
  Gaussian) over every entry, and the fraction of entries with |x| > OUTLIER_MULTIPLE · RMS.
- Adam state (per layer and block role, and per global role): ‖m‖, ‖v‖ (Frobenius over the cell's
  tensors, after the update), and the ε-dominance fraction: the share of coordinates where
  ε ≥ √v̂ (v̂ = v / (1 − β₂ᵗ), as AdamW's denominator √v̂ + ε uses it), i.e. where ε, not the gradient
  scale, sets the step. The RMS of the actual update is the built-in `update_rms`.
- weights (per layer and hidden matrix): the spectral norm ‖W‖₂ by power iteration (warm-started
  from the previous probe step's singular vector, `POWER_STEPS` steps; `COLD_POWER_STEPS` the first
  time), the relative spectral update ‖ΔW‖₂/‖W‖₂ for the update of this step, and the stable rank
  ‖W‖_F² / ‖W‖₂².
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from probes.hooks import SiteSpec, capture
from probes.schema import BLOCK_ROLES, GLOBAL_ROLES, INTERNAL_SITES, SITES
from trainer.distributed import full_parameters, local_part, sum_across_ranks

OUTLIER_MULTIPLE = 6.0  # act_outlier_frac counts entries with |x| > 6 × RMS (Gaussian: 2e-9)
POWER_STEPS = 10  # power-iteration steps per health step, from the previous one's vector
COLD_POWER_STEPS = 20  # ... and the first time, from a fixed random vector
HEALTH_EVERY = 100  # default cadence (steps) of the attention and activation statistics: see benchmarks/RESULTS.md
HEADS_KEY = "attn_heads"  # in the statistics' state: heads per layer, for the NaN rows between full steps


# --- attention ---------------------------------------------------------------------------------------
def attention_reductions(logits: torch.Tensor, allowed: torch.Tensor | None = None,
                         probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max logit, mean entropy in nats, mean entropy / log(context length)), each per head.

    `logits`: (batch, heads, queries, keys) pre-softmax scores after the scale; `allowed`: a bool mask
    broadcastable to it (None: every finite score is allowed); `probs`: the softmax over the allowed
    keys when the model already computed it (else computed here). Queries that see one key only
    (entropy 0 / log 1) are left out of the normalized mean.
    """
    logits = logits.float()
    if allowed is None:
        allowed = torch.isfinite(logits)
        masked = logits
    else:
        allowed = allowed.expand_as(logits)
        masked = logits.masked_fill(~allowed, float("-inf"))
    max_logit = masked.amax(dim=(0, 2, 3))
    if probs is None:
        probs = masked.softmax(dim=-1)
    entropy = -torch.special.xlogy(probs.float(), probs.float()).sum(-1)  # (b, h, q)
    context = allowed.sum(-1)  # keys each query may attend to
    several = context > 1
    norm = torch.where(several, entropy / context.clamp(min=2).float().log(), torch.zeros_like(entropy))
    norm_mean = norm.sum(dim=(0, 2)) / several.sum(dim=(0, 2)).clamp(min=1)
    return max_logit, entropy.mean(dim=(0, 2)), norm_mean


def attention_sites(adapter, layer: int) -> dict[str, SiteSpec]:
    """The `attn_logits` and `attn_probs` sites of block `layer`, where the adapter's `internal_sites`
    exposes them (the built-in GPT, on its math attention path); empty otherwise."""
    try:
        sites = adapter.internal_sites(layer)
    except (NotImplementedError, AttributeError):
        return {}
    return {name: spec for name, spec in sites.items() if name in ("attn_logits", "attn_probs")}


@contextmanager
def _math_attention(adapter) -> Iterator[None]:
    """The model's attention on its explicit (math) path, where the logits are materialized."""
    model = adapter.model
    ctx = model.attention_backend("math") if hasattr(model, "attention_backend") else adapter.linearizable()
    with ctx:
        yield


@contextmanager
def _parameters_set_to(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model's parameters temporarily hold `values` (bitwise restored on exit)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


@torch.no_grad()
def attention_statistics(adapter, acts: dict, batch: torch.Tensor | None,
                         params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """attn_max_logit, attn_entropy, attn_entropy_norm: (layer, head) tensors on the device.

    Measured at the parameters `params` (θ_t, where `acts` were captured): each attention branch is
    replayed as a pure function of them on its captured input.
    """
    per_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    branches = [adapter.branch(layer, "attn") for layer in range(adapter.depth)]
    sites = [attention_sites(adapter, layer) for layer in range(adapter.depth)]
    if all("attn_logits" in found for found in sites):
        global_names = {id(p): n for n, p in adapter.model.named_parameters()}
        with _math_attention(adapter):
            for layer, (branch, input_site) in enumerate(branches):
                # Whole tensors of this branch (sharded: an all-gather every rank takes part in).
                local = full_parameters({k: params[global_names[id(p)]] for k, p in branch.named_parameters()})
                with capture(sites[layer]) as found:
                    torch.func.functional_call(branch, local, (acts[(layer, input_site)],))
                per_layer.append(attention_reductions(found["attn_logits"], probs=found.get("attn_probs")))
    elif batch is not None and hasattr(adapter.model, "set_attn_implementation"):  # a Hugging Face model
        from probes.hf_attention import recorded_attention

        model, was_training = adapter.model, adapter.model.training
        model.eval()  # no dropout (and no RNG use) in a probe forward
        try:
            with _parameters_set_to(model, params), recorded_attention(model) as records:
                adapter.loss(batch)
        finally:
            model.train(was_training)
        per_layer = [records.get(layer) for layer in range(adapter.depth)]
    device = next(iter(acts.values())).device
    heads = max((r[0].numel() for r in per_layer if r is not None), default=1)
    nan = torch.full((heads,), float("nan"), device=device)
    rows = [r if r is not None else (nan, nan, nan) for r in per_layer] or [(nan, nan, nan)] * adapter.depth
    return {name: torch.stack([r[i] for r in rows]).to(device)
            for i, name in enumerate(("attn_max_logit", "attn_entropy", "attn_entropy_norm"))}


# --- activations -------------------------------------------------------------------------------------
def activation_reductions(x: torch.Tensor) -> torch.Tensor:
    """(abs-max, kurtosis E[(x-µ)⁴]/Var², fraction with |x| > OUTLIER_MULTIPLE·RMS) of all entries.

    Written for few passes over the tensor (this runs on every stream and branch site).
    """
    x = x.float().reshape(-1)
    n = x.numel()
    mean = x.mean()
    c2 = (x - mean).square_()
    var = c2.mean()
    kurtosis = torch.dot(c2, c2) / n / var.square()
    rms = (var + mean.square()).sqrt()
    a = x.abs()
    outliers = torch.count_nonzero(a > OUTLIER_MULTIPLE * rms) / n
    return torch.stack([a.max(), kurtosis, outliers])


def internal_sites(adapter) -> dict[tuple[int, str], SiteSpec]:
    """(layer, internal site) → where, for every layer, from `adapter.internal_sites` (the shared adapter
    contract: "mlp_hidden", the input of the MLP's down projection; "attn_mix", the input of the
    attention's output projection); empty for an adapter without it."""
    if not hasattr(adapter, "internal_sites"):
        return {}
    try:
        return {(layer, name): spec for layer in range(adapter.depth)
                for name, spec in adapter.internal_sites(layer).items() if name in INTERNAL_SITES}
    except NotImplementedError:
        return {}


@torch.no_grad()
def internal_statistics(inner: dict, depth: int) -> torch.Tensor | None:
    """(layer, internal site, [abs-max, kurtosis, outlier share]) of the captured internal activations."""
    if not inner:
        return None
    device = next(iter(inner.values())).device
    nan = torch.full((3,), float("nan"), device=device)
    return torch.stack([torch.stack([activation_reductions(inner[(layer, name)].detach())
                                     if (layer, name) in inner else nan for name in INTERNAL_SITES])
                        for layer in range(depth)])


def activation_statistics(acts: dict, depth: int) -> dict[str, torch.Tensor]:
    """act_absmax, act_kurtosis, act_outlier_frac: (layer, site); NaN where a site is absent."""
    nan = None
    rows = []
    for layer in range(depth):
        row = []
        for site in SITES:
            if (layer, site) in acts:
                row.append(activation_reductions(acts[(layer, site)]))
            else:
                if nan is None:
                    nan = torch.full((3,), float("nan"), device=next(iter(acts.values())).device)
                row.append(nan)
        rows.append(torch.stack(row))
    table = torch.stack(rows)  # (layer, site, 3)
    return {"act_absmax": table[..., 0], "act_kurtosis": table[..., 1], "act_outlier_frac": table[..., 2]}


# --- Adam state ----------------------------------------------------------------------------------------
def _cells(names: list[str], roles: dict[str, str], layers: dict[str, int | None], depth: int) -> torch.Tensor:
    """Cell index per tensor: layer·|BLOCK_ROLES| + role for block roles, then the global roles, then a
    dump cell for roles that are not reported."""
    n_block = depth * len(BLOCK_ROLES)
    index = []
    for n in names:
        role, layer = roles[n], layers[n]
        if layer is not None and role in BLOCK_ROLES:
            index.append(layer * len(BLOCK_ROLES) + BLOCK_ROLES.index(role))
        elif role in GLOBAL_ROLES:
            index.append(n_block + GLOBAL_ROLES.index(role))
        else:
            index.append(n_block + len(GLOBAL_ROLES))
    return torch.tensor(index)


def adam_statistics(model: nn.Module, optimizer: torch.optim.Optimizer | None, roles: dict[str, str],
                    layers: dict[str, int | None], depth: int) -> dict[str, torch.Tensor]:
    """adam_m_norm, adam_v_norm, adam_eps_dominance per (layer, block_role), global_* per global role.

    Read from `optimizer.state` (exp_avg, exp_avg_sq, step) after the update; NaN for a cell with no
    Adam state (no optimizer, or not an Adam-family optimizer).
    """
    n_block = depth * len(BLOCK_ROLES)
    cells = n_block + len(GLOBAL_ROLES) + 1
    device = next(model.parameters()).device
    group_of = {}
    if optimizer is not None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names, m2, v2, dominated, count, sharded = [], [], [], [], [], []
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        if name not in roles or "exp_avg_sq" not in state:
            continue
        group = group_of[id(p)]
        beta2, eps = group["betas"][1], group["eps"]
        step = state["step"]
        step = step.to(device=device, dtype=torch.float32) if isinstance(step, torch.Tensor) else float(step)
        # Sharded (FSDP2) state: this rank's shard here, the shards' sums added across ranks below.
        v = local_part(state["exp_avg_sq"].detach())
        sharded.append(local_part(state["exp_avg_sq"]) is not state["exp_avg_sq"])
        sqrt_v_hat = (v.float() / (1 - beta2**step)).sqrt()
        names.append(name)
        m2.append(local_part(state["exp_avg"].detach()).float().pow(2).sum())
        v2.append(v.float().pow(2).sum())
        dominated.append((sqrt_v_hat <= eps).sum().float())
        count.append(torch.tensor(float(v.numel()), device=device))
    if not names:
        nan = torch.full((cells,), float("nan"), device=device)
        sums = [nan, nan, nan, nan]
    else:
        idx = _cells(names, roles, layers, depth).to(device)
        per_param = torch.stack([torch.stack(v).float() for v in (m2, v2, dominated, count)])  # (4, params)
        if any(sharded):  # one all-reduce; unsharded tensors (the same on every rank) counted once
            mask = torch.tensor(sharded, device=device)
            per_param = torch.where(mask, sum_across_ranks(torch.where(mask, per_param, 0.0)), per_param)
        sums = [torch.zeros(cells, device=device).index_add_(0, idx, row) for row in per_param]
    m2c, v2c, dc, nc = sums
    empty = nc == 0
    out = {
        "adam_m_norm": m2c.sqrt().masked_fill(empty, float("nan")),
        "adam_v_norm": v2c.sqrt().masked_fill(empty, float("nan")),
        "adam_eps_dominance": (dc / nc).masked_fill(empty, float("nan")),
    }
    result = {}
    for name, value in out.items():
        result[name] = value[:n_block].view(depth, len(BLOCK_ROLES))
        result["global_" + name] = value[n_block:-1]
    return result


# --- spectra -------------------------------------------------------------------------------------------
def block_pattern(adapter) -> str:
    """The regex whose group 1 is a parameter name's block index: the adapter's, else the first
    numeric component of the name (`model.layers.3.` → 3)."""
    return getattr(adapter, "block_pattern", r"(?:^|\.)(\d+)\.")


def hidden_matrices(roles: dict[str, str], block_pattern: str) -> dict[str, list[tuple[int, str]]]:
    """Local name inside a block (e.g. "attn_branch.attn.qkv.weight") → [(layer, parameter name)],
    for the hidden weights; the local names are the store's `matrix` coordinate."""
    out: dict[str, list[tuple[int, str]]] = {}
    for name, role in roles.items():
        match = re.search(block_pattern, name)
        if role == "hidden_weight" and match:
            out.setdefault(name[match.end():], []).append((int(match.group(1)), name))
    return out


def power_iteration(w: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_max estimate, right singular vector estimate) of a matrix after `steps` power steps from `v`.

    The estimate ‖W v‖ never exceeds the true σ_max and converges to it from below.
    """
    for _ in range(steps):
        u = w @ v
        u = u / u.norm().clamp(min=1e-30)
        v = w.T @ u
        v = v / v.norm().clamp(min=1e-30)
    return (w @ v).norm(), v


def _start_vector(n: int, device: torch.device, seed: int) -> torch.Tensor:
    # A private generator: the probes never touch the global RNG (training stays bitwise the same).
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (v / v.norm()).to(device)


def spectral_statistics(params_before: dict[str, torch.Tensor], params_after: dict[str, torch.Tensor],
                        matrices: dict[str, list[tuple[int, str]]], depth: int,
                        state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_spectral_norm ‖W_t‖₂, update_spectral_rel ‖W_{t+1} − W_t‖₂ / ‖W_t‖₂, weight_stable_rank
    ‖W_t‖_F² / ‖W_t‖₂²: (layer, matrix). `state` holds the warm-start vectors between probe steps."""
    device = next(iter(params_before.values())).device
    table = torch.full((3, depth, max(len(matrices), 1)), float("nan"), device=device)
    for j, (_, entries) in enumerate(matrices.items()):
        for layer, name in entries:
            # Whole matrices (sharded: an all-gather every rank takes part in, in the same order).
            whole = full_parameters({"before": params_before[name], "after": params_after[name]})
            w = whole["before"].detach().float().flatten(1)
            dw = whole["after"].detach().float().flatten(1) - w
            sigmas = []
            for kind, m in (("w", w), ("dw", dw)):
                key = f"{name}|{kind}"
                warm = key in state
                v = state[key] if warm else _start_vector(m.shape[1], device, seed=zlib.crc32(key.encode()))
                sigma, state[key] = power_iteration(m, v, POWER_STEPS if warm else COLD_POWER_STEPS)
                sigmas.append(sigma)
            table[0, layer, j] = sigmas[0]
            table[1, layer, j] = sigmas[1] / sigmas[0]
            table[2, layer, j] = w.pow(2).sum() / sigmas[0].pow(2)
    return {"weight_spectral_norm": table[0], "update_spectral_rel": table[1], "weight_stable_rank": table[2]}


def health_statistics(ctx, full: bool = True) -> dict[str, torch.Tensor]:
    """Every training-health variable of probes.schema for one probe step (device tensors).

    Measured when `full`, else NaN of the same shapes (their cadence: `ProbeSession.health_every`;
    the probe budget is shared with the other probes, and all of these together cost about 0.3 of a
    training step per probe step on the benchmark CPU model).
    """
    adapter = ctx.adapter
    out = {}
    device = ctx.probe_loss.device
    if adapter is not None:
        matrices = hidden_matrices(ctx.roles, block_pattern(adapter))
        if full:
            out.update(adam_statistics(adapter.model, ctx.optimizer, ctx.roles, ctx.layers, ctx.depth))
            out.update(spectral_statistics(ctx.params_before, ctx.params_after, matrices, ctx.depth, ctx.state))
        else:
            for name in ("adam_m_norm", "adam_v_norm", "adam_eps_dominance"):
                out[name] = torch.full((ctx.depth, len(BLOCK_ROLES)), float("nan"), device=device)
                out["global_" + name] = torch.full((len(GLOBAL_ROLES),), float("nan"), device=device)
            for name in ("weight_spectral_norm", "update_spectral_rel", "weight_stable_rank"):
                out[name] = torch.full((ctx.depth, max(len(matrices), 1)), float("nan"), device=device)
    internal = ctx.extras.get("internal") if full else None
    if internal is None:
        internal = torch.full((ctx.depth, len(INTERNAL_SITES), 3), float("nan"), device=device)
    out.update({"internal_absmax": internal[..., 0], "internal_kurtosis": internal[..., 1],
                "internal_outlier_frac": internal[..., 2]})
    if full:
        out.update(activation_statistics(ctx.acts, ctx.depth))
        if adapter is not None:
            out.update(attention_statistics(adapter, ctx.acts, ctx.batch, ctx.params_before))
            ctx.state[HEADS_KEY] = torch.tensor(out["attn_max_logit"].shape[1])
    else:
        for name in ("act_absmax", "act_kurtosis", "act_outlier_frac"):
            out[name] = torch.full((ctx.depth, len(SITES)), float("nan"), device=device)
        if adapter is not None:
            heads = int(ctx.state[HEADS_KEY])
            for name in ("attn_max_logit", "attn_entropy", "attn_entropy_norm"):
                out[name] = torch.full((ctx.depth, heads), float("nan"), device=device)
    return out


def health_coords(adapter) -> dict[str, list]:
    """Store coordinates of the health dims: `matrix` (local names of the hidden weights)."""
    names = list(hidden_matrices(adapter.parameter_roles(), block_pattern(adapter)))
    return {"matrix": names or ["none"], "internal_site": list(INTERNAL_SITES)}


def expected_entropy_uniform(t: int) -> float:
    """Mean entropy (nats) of uniform causal attention over t queries: mean of log(i+1), i < t."""
    return sum(math.log(i + 1) for i in range(t)) / t

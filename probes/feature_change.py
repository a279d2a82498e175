"""Weight-driven change of each block's internal features since initialization (no Jacobians).

For branch F of block l with input h (read from the probe forward at θ_t) and internal feature φ
(the adapter's `internal_sites`: "mlp_hidden" for the MLP, the activation after the non-linearity;
"attn_mix" for attention, the heads' attention-weighted values; "attn_probs", the pattern):

    feature_change = ‖φ(h; θ_t) − φ(h; θ_0)‖ / ‖φ(h; θ_0)‖          (Frobenius norms over the batch)
    feature_cka    = linear CKA between φ(h; θ_t) and φ(h; θ_0) over the probe tokens

Both are evaluated on the same input h, so they isolate what the branch's *own* parameters did to its
features; the change of h itself (earlier layers learning) is left out. Theory (analyses/theory.py):
with in-block Adam LR ∝ m_L^(α−1), θ_t − θ_0 ∝ m_L^(α−1) per entry, so feature_change ∝ L^(α−1)
(first order) and 1 − CKA ∝ L^(2(α−1)) (CKA is invariant to scale and maximal at φ_t = φ_0, so
its first-order term vanishes). This shares no code path with the JVP linearization ratio.

Memory: θ_0 of the block parameters is kept once on the device, in the parameters' own dtype: one
extra copy of the blocks (≈ 12·L·N² numbers; e.g. 3.2 MB for N = 128, L = 4 in float32). Cost: two
forwards of each branch (at θ_t and θ_0) on the first `batch_size` probe sequences per probe step.

Sharded parameters (FSDP2): θ_0 is kept whole (all-gathered once, at the first probe step), so each
rank holds one full copy of the block parameters; θ_t is all-gathered one branch at a time, and every
rank evaluates every branch (the values are the same on every rank).
"""

from __future__ import annotations

import torch
from torch import nn

from probes.adapters import ModelAdapter
from probes.hooks import capture
from probes.linearization import call_with
from probes.schema import BRANCHES
from trainer.distributed import full_parameters

# The internal feature φ of each branch.
FEATURE_SITES: dict[str, str] = {"attn": "attn_mix", "mlp": "mlp_hidden"}
PATTERN_SITE = "attn_probs"


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) between two feature sets over the same n examples.

    `x`: (..., d_x), `y`: (..., d_y); all leading dims are flattened into the n examples (tokens).
    CKA = ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) with columns centred over the examples; computed
    through the n×n Gram matrices when n is smaller than the feature widths (same value, cheaper).
    Returns a 0-d tensor in [0, 1] (1: the same features up to rotation and scale).
    """
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        return (kx * ky).sum() / (torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky))
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))


def relative_change(now: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """‖now − ref‖ / ‖ref‖ (Frobenius, float64 accumulation), a 0-d tensor."""
    now, ref = now.double(), ref.double()
    return torch.linalg.vector_norm(now - ref) / torch.linalg.vector_norm(ref)


class FeatureChange:
    """θ_0 of every branch, kept once; at each probe step, the feature change and CKA per branch."""

    def __init__(self, adapter: ModelAdapter, batch_size: int | None = None):
        """`batch_size`: evaluate on the first that many probe sequences (None: all)."""
        self.adapter, self.batch_size = adapter, batch_size
        self.theta0: dict[str, torch.Tensor] | None = None  # model parameter name → θ_0 (blocks only)
        names = {id(p): n for n, p in adapter.model.named_parameters()}
        self._branches: list[tuple[int, str, nn.Module, str, dict[str, str]]] = []
        for layer in range(adapter.depth):
            for branch_name in BRANCHES:
                module, input_site = adapter.branch(layer, branch_name)
                local = {k: names[id(p)] for k, p in module.named_parameters()}
                self._branches.append((layer, branch_name, module, input_site, local))

    @property
    def names(self) -> set[str]:
        """Model parameter names that θ_0 holds: every branch's own parameters."""
        return {g for *_, local in self._branches for g in local.values()}

    def set_reference(self, params: dict[str, torch.Tensor]) -> None:
        """Keep θ_0 (a copy of the branches' parameters in `params`, model name → tensor)."""
        # Sorted: a set's order differs between processes, and the all-gathers must match across ranks.
        whole = full_parameters({n: params[n] for n in sorted(self.names)})
        self.theta0 = {n: t.detach().clone() for n, t in whole.items()}

    def measure(self, acts: dict[tuple[int, str], torch.Tensor],
                params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feature_change, feature_cka (depth × branch) and attn_pattern_change (depth) at θ = `params`.

        `acts` are the probe forward's activations at θ_t ((layer, site) → tensor), `params` θ_t by
        model parameter name. Values are device tensors; NaN where the adapter has no such site.
        """
        if self.theta0 is None:
            raise RuntimeError("FeatureChange.measure before set_reference (θ_0 unknown)")
        depth = self.adapter.depth
        device = next(iter(acts.values())).device
        change = torch.full((depth, len(BRANCHES)), float("nan"), dtype=torch.float64, device=device)
        cka = change.clone()
        pattern = torch.full((depth,), float("nan"), dtype=torch.float64, device=device)
        with torch.no_grad(), self.adapter.linearizable():
            for layer, branch_name, module, input_site, local in self._branches:
                try:
                    internal = self.adapter.internal_sites(layer)
                except NotImplementedError:
                    continue
                wanted = {k: internal[k] for k in (FEATURE_SITES[branch_name], PATTERN_SITE) if k in internal}
                h = acts[(layer, input_site)][: self.batch_size]
                dtype = next(iter(params[g] for g in local.values())).dtype
                h = h.to(dtype)
                # Whole tensors of this branch (sharded: an all-gather that every rank takes part in).
                theta_t = full_parameters({k: params[g] for k, g in local.items()})
                now = self._features(module, h, theta_t, wanted)
                ref = self._features(module, h, {k: self.theta0[g] for k, g in local.items()}, wanted)
                col = BRANCHES.index(branch_name)
                site = FEATURE_SITES[branch_name]
                if site in now:
                    change[layer, col] = relative_change(now[site], ref[site])
                    cka[layer, col] = linear_cka(now[site], ref[site])
                if branch_name == "attn" and PATTERN_SITE in now:
                    pattern[layer] = relative_change(now[PATTERN_SITE], ref[PATTERN_SITE])
        return {"feature_change": change, "feature_cka": cka, "attn_pattern_change": pattern}

    @staticmethod
    def _features(module: nn.Module, h: torch.Tensor, params: dict[str, torch.Tensor],
                  sites: dict) -> dict[str, torch.Tensor]:
        with capture(sites) as store:
            call_with(module, params, h)
        return dict(store)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return None if self.theta0 is None else {n: t.cpu() for n, t in self.theta0.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
        self.theta0 = None if state is None else {n: t.to(device) for n, t in state.items()}

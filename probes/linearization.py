"""Linearization error of a residual branch with respect to its own parameters (spec §3.5).

For branch F with input h held fixed, parameters θ_t and the optimizer's actual update Δθ:
    lin = J_θ F(h; θ_t) · Δθ                       (forward-mode AD: torch.func.jvp)
    nl  = F(h; θ_t + Δθ) − F(h; θ_t) − lin
and the ratios ‖nl‖/‖lin‖ (expected ∝ m_L^(α−1)) and ‖nl‖/‖F‖ (∝ m_L^(2(α−1))).

This is the whole batch and every parameter of the branch (LayerNorm included), not one coordinate
of one matrix: the authors' notebook broadcast row 0 of ΔW over the full gradient, which measures
the update's size rather than the branch's non-linearity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp


@dataclass
class LinearizationResult:
    """Frobenius norms over the batch (0-d tensors, still on the device)."""

    branch_norm: torch.Tensor  # ‖F(h; θ_t)‖
    lin_norm: torch.Tensor  # ‖J Δθ‖
    nonlin_norm: torch.Tensor  # ‖F(θ_t+Δθ) − F(θ_t) − J Δθ‖

    @property
    def lin_ratio(self) -> torch.Tensor:
        return self.nonlin_norm / self.lin_norm

    @property
    def nonlin_to_output(self) -> torch.Tensor:
        return self.nonlin_norm / self.branch_norm


def branch_linearization(
    branch: nn.Module,
    h: torch.Tensor,
    params_before: dict[str, torch.Tensor],
    params_after: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float64,
) -> LinearizationResult:
    """Linearization error of `branch(h)` for the update params_before → params_after.

    `params_*` map the branch's own parameter names (as `branch.named_parameters()` gives them) to
    tensors. Evaluation is in `dtype` (float64 by default: the ratios can be ~1e-6, far below float32
    round-off of F(θ_t+Δθ) − F(θ_t)). Differences Δθ are taken after the cast, in `dtype`.
    """
    theta = {k: v.detach().to(dtype) for k, v in params_before.items()}
    delta = {k: params_after[k].detach().to(dtype) - theta[k] for k in theta}
    x = h.detach().to(dtype)

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(branch, p, (x,))

    with torch.no_grad():
        out, lin = jvp(f, (theta,), (delta,))
        after = f({k: theta[k] + delta[k] for k in theta})
        nonlin = after - out - lin
    return LinearizationResult(
        branch_norm=torch.linalg.vector_norm(out),
        lin_norm=torch.linalg.vector_norm(lin),
        nonlin_norm=torch.linalg.vector_norm(nonlin),
    )


def finite_difference_jvp(
    branch: nn.Module, h: torch.Tensor, params: dict[str, torch.Tensor], direction: dict[str, torch.Tensor],
    step: float = 1e-5,
) -> torch.Tensor:
    """Central finite difference (F(θ+εv) − F(θ−εv)) / 2ε in float64: the cross-check of the JVP."""
    p64 = {k: v.detach().double() for k, v in params.items()}
    v64 = {k: direction[k].detach().double() for k in p64}
    x = h.detach().double()
    with torch.no_grad():
        plus = functional_call(branch, {k: p64[k] + step * v64[k] for k in p64}, (x,))
        minus = functional_call(branch, {k: p64[k] - step * v64[k] for k in p64}, (x,))
    return (plus - minus) / (2 * step)

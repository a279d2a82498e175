"""Linearization error of a residual branch with respect to its own parameters (spec §3.5).

For branch F with input h held fixed, parameters θ_t and the optimizer's actual update Δθ:
    lin = J_θ F(h; θ_t) · Δθ                       (forward-mode AD)
    nl  = F(h; θ_t + Δθ) − F(h; θ_t) − lin
and the ratios ‖nl‖/‖lin‖ (expected ∝ m_L^(α−1)) and ‖nl‖/‖F‖ (∝ m_L^(2(α−1))).

This is the whole batch and every parameter of the branch (LayerNorm included), not one coordinate
of one matrix: the authors' notebook broadcast row 0 of ΔW over the full gradient, which measures
the update's size rather than the branch's non-linearity.

Precision. nl is a small difference of two large evaluations, so each evaluation's round-off lands
in it whole: in float32 that is about eps32 · ‖F‖ ≈ 1e-7 ‖F‖ per evaluation, while ‖nl‖ shrinks with
the square of the update (with the square of the LR factor: 1e-4 of its peak value at a factor of
0.01, in warmup or at the end of a decay). There float32 measures round-off, not the branch: the
α = ½ depth slope of lin_ratio flips sign (benchmarks/RESULTS.md, "Linearization precision").
Float64 (the default on every device) puts the floor ~5e8 times lower, exact to the precision the
parameters and activations are stored in (float32). Float32 evaluation is allowed only with a
*measured* floor per branch and probe step: one extra float64 evaluation of F(h; θ_t) gives the
float32 evaluation's actual round-off r = F32 − F64, and the floor of the difference of two such
evaluations is √2 · ‖r‖ (independent round-offs add in quadrature). Where ‖nl‖ < LIN_FLOOR_MULTIPLE
× floor, the recorded ‖nl‖ and both ratios are NaN and `below_floor` is set: a value is never a
number that round-off made. At the multiple 10 the round-off left in an accepted value is ≤ 10% of
it (≈ 0.5% bias, round-off being nearly orthogonal to nl). Against the float32 error measured
directly (float32 nl minus float64 nl) the floor was within 0.9–1.1× at small updates, where it
decides, and up to 2.6× low at first-step updates of ~10% of F, where nl is ~1e5 floors above it.
Being measured rather than assumed (eps32 · ‖F‖), the floor also covers float32 matmuls that run
as TF32 on a GPU (`torch.set_float32_matmul_precision("high")`: 10-bit mantissa).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from probes.schema import LIN_FLOOR_MULTIPLE


@dataclass
class LinearizationResult:
    """Frobenius norms over the batch (0-d tensors, still on the device).

    `nonlin_norm` is NaN where it sits below the round-off floor (`below_floor`); `nonlin_norm_raw`
    is the number as computed. `nonlin_floor` is NaN when no floor was measured (float64 evaluation).
    """

    branch_norm: torch.Tensor  # ‖F(h; θ_t)‖
    lin_norm: torch.Tensor  # ‖J Δθ‖
    nonlin_norm_raw: torch.Tensor  # ‖F(θ_t+Δθ) − F(θ_t) − J Δθ‖ as evaluated
    nonlin_floor: torch.Tensor  # √2 ‖F32(θ_t) − F64(θ_t)‖: round-off floor of ‖nl‖ (NaN: not measured)

    @property
    def below_floor(self) -> torch.Tensor:
        """True where ‖nl‖ < LIN_FLOOR_MULTIPLE × floor (always False when no floor was measured)."""
        return self.nonlin_norm_raw < LIN_FLOOR_MULTIPLE * self.nonlin_floor  # NaN floor compares False

    @property
    def nonlin_norm(self) -> torch.Tensor:
        """‖nl‖, or NaN where round-off could make up a tenth of it or more."""
        return self.nonlin_norm_raw.masked_fill(self.below_floor, math.nan)

    @property
    def lin_ratio(self) -> torch.Tensor:
        return self.nonlin_norm / self.lin_norm

    @property
    def nonlin_to_output(self) -> torch.Tensor:
        return self.nonlin_norm / self.branch_norm


def result_table(results: dict[tuple[int, str], LinearizationResult], depth: int,
                 branches: tuple[str, ...]) -> LinearizationResult:
    """The (layer, branch) grid of results as one result whose norms are (depth, branches) tensors.

    One stack for the grid instead of one per norm and row; the ratios and the floor test are then
    elementwise on the table (the same operations on the same numbers as per result, bitwise).
    """
    names = [f.name for f in fields(LinearizationResult)]
    cells = [results[(layer, b)] for layer in range(depth) for b in branches]
    table = torch.stack([torch.stack([getattr(r, n) for n in names]) for r in cells])  # (cells, fields)
    return LinearizationResult(*(column.view(depth, len(branches)) for column in table.unbind(1)))


def branch_linearization(
    branch: nn.Module,
    h: torch.Tensor,
    params_before: dict[str, torch.Tensor],
    params_after: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float64,
    measure_floor: bool = True,
) -> LinearizationResult:
    """Linearization error of `branch(h)` for the update params_before → params_after.

    `params_*` map the branch's own parameter names (as `branch.named_parameters()` gives them) to
    tensors. Evaluation is in `dtype` (float64 by default: the ratios can be ~1e-6, far below float32
    round-off of F(θ_t+Δθ) − F(θ_t)). Differences Δθ are taken after the cast, in `dtype`. Below
    float64, the round-off floor is measured with one float64 evaluation of F(h; θ_t) (module
    docstring) unless `measure_floor` is False (benchmarks only: the values are then unguarded).
    """
    names = list(params_before)
    theta = [params_before[k].detach().to(dtype) for k in names]
    # One foreach call per list instead of one op per tensor (the same elementwise kernels, bitwise).
    delta = torch._foreach_sub([params_after[k].detach().to(dtype) for k in names], theta)
    x = h.detach().to(dtype)

    def f(p: dict[str, torch.Tensor], inputs: torch.Tensor = x) -> torch.Tensor:
        return call_with(branch, p, inputs)

    with torch.no_grad():
        out, lin = parameter_jvp(branch, x, dict(zip(names, theta)), dict(zip(names, delta)))
        after = f(dict(zip(names, torch._foreach_add(theta, delta))))
        nonlin = after - out - lin
        floor = torch.full((), math.nan, device=out.device)
        if dtype != torch.float64 and measure_floor:
            exact = f({k: v.detach().double() for k, v in params_before.items()}, h.detach().double())
            floor = math.sqrt(2) * torch.linalg.vector_norm(out.double() - exact)
    return LinearizationResult(
        branch_norm=torch.linalg.vector_norm(out),
        lin_norm=torch.linalg.vector_norm(lin),
        nonlin_norm_raw=torch.linalg.vector_norm(nonlin),
        nonlin_floor=floor.to(out.dtype),
    )


_TIES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def ties_tensors(module: nn.Module) -> bool:
    """Whether `module` holds one parameter or buffer under two names (tied weights); cached per module."""
    if module not in _TIES:
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        _TIES[module] = len({id(t) for _, t in named}) < len(named)
    return _TIES[module]


def call_with(module: nn.Module, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """`module(h)` with its parameters replaced by `params` (`torch.func.functional_call`).

    The search for tied tensors that functional_call makes on every call (≈ 20 µs, a tenth of a small
    branch's forward) runs only for a module that ties any: without ties the call is the same.
    """
    return functional_call(module, params, (h,), tie_weights=ties_tensors(module))


def parameter_jvp(module: nn.Module, h: torch.Tensor, params: dict[str, torch.Tensor],
                  direction: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(module(h; params), J_θ module(h; params) · direction): forward-mode AD in the parameters only.

    The input h is given an explicit tangent of zeros rather than none. Both are the same JVP (bitwise:
    the zero terms add exact zeros), but with none, every op that mixes h's path with a tangent-carrying
    parameter (the norm's gain and bias, the bias of a linear layer) represents h's missing tangent as a
    lazy zero tensor, and PyTorch evaluates ops on those through Python meta kernels (≈ 0.15 ms each):
    at the `--quick` benchmark shape that made a branch's JVP 1.8× (MLP) and 1.3× (attention) slower,
    most of a probe step's linearization (benchmarks/RESULTS.md, "Small shapes, after").

    Dual tensors of `torch.autograd.forward_ad` rather than `torch.func.jvp`: the same forward-mode
    formulas (bitwise the same primal and tangent, tested), without functorch's wrapping of every
    tensor, ≈ 1.5× faster per branch at the `--quick` shape ("Small shapes, round 2").
    """
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(v, direction[k]) for k, v in params.items()}
        out = call_with(module, duals, fwAD.make_dual(h, torch.zeros_like(h)))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, torch.zeros_like(primal) if tangent is None else tangent


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

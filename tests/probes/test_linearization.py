"""The linearization error against independent computations: finite differences, exact algebra."""

import pytest
import torch
from torch import nn

from probes.linearization import branch_linearization, finite_difference_jvp, parameter_jvp
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization


def _perturbed(params: dict, scale: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = GPT(Parameterization(name="alpha", alpha=1.0, width=64, depth=2, base_width=64), ModelConfig(seq_len=16))
    return model.double()


def _branch_problem(gpt, layer: int, branch_name: str, seed: int):
    """(branch, its parameters, a random direction of relative size 1e-2, a random float64 input)."""
    branch = getattr(gpt.blocks[layer], branch_name)
    params = {k: v.detach() for k, v in branch.named_parameters()}
    direction = {k: v - params[k] for k, v in _perturbed(params, 1e-2, seed=seed).items()}
    h = torch.randn(2, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return branch, params, direction, h


@pytest.mark.parametrize("branch_name", ["attn_branch", "mlp_branch"])
def test_jvp_matches_central_finite_difference(gpt, branch_name):
    # J·v by forward-mode AD must equal (F(θ+εv) − F(θ−εv)) / 2ε up to the O(ε²) truncation error.
    branch, params, direction, h = _branch_problem(gpt, 1, branch_name, seed=1)
    with gpt.attention_backend("math"):
        _, jvp_out = torch.func.jvp(lambda p: torch.func.functional_call(branch, p, (h,)), (params,), (direction,))
        fd = finite_difference_jvp(branch, h, params, direction, step=1e-5)
    rel = (jvp_out - fd).norm() / jvp_out.norm()
    assert rel < 1e-6, rel


@pytest.mark.parametrize("branch_name", ["attn_branch", "mlp_branch"])
def test_parameter_jvp_is_the_jvp_in_the_parameters_only(gpt, branch_name):
    # parameter_jvp gives h an explicit zero tangent (for speed): the output must be the branch's own
    # output, the tangent the same as torch.func.jvp with h held constant (to float64 round-off) and as a
    # central finite difference of the branch module.
    branch, params, direction, h = _branch_problem(gpt, 0, branch_name, seed=3)
    with gpt.attention_backend("math"), torch.no_grad():
        out, tangent = parameter_jvp(branch, h, params, direction)
        out_ref, tangent_ref = torch.func.jvp(lambda p: torch.func.functional_call(branch, p, (h,)),
                                              (params,), (direction,))
        fd = finite_difference_jvp(branch, h, params, direction, step=1e-5)
        own = branch(h)
    assert torch.allclose(out, own, rtol=1e-12, atol=0)
    assert (tangent - tangent_ref).norm() / tangent_ref.norm() < 1e-12
    assert (tangent - fd).norm() / tangent.norm() < 1e-6


def test_branch_linear_in_its_parameters_has_roundoff_nonlinearity():
    # y = W x + b is linear in (W, b): F(θ+Δθ) − F(θ) − JΔθ is zero up to float64 round-off.
    torch.manual_seed(0)
    layer = nn.Linear(32, 48).double()
    before = {k: v.detach() for k, v in layer.named_parameters()}
    after = _perturbed(before, 0.1, seed=3)
    h = torch.randn(4, 8, 32, dtype=torch.float64)
    result = branch_linearization(layer, h, before, after)
    assert result.lin_norm > 1e-2
    assert result.lin_ratio < 1e-13


class Bilinear(nn.Module):
    """F(x) = W2 W1 x: the second-order term of an update is exactly ΔW2 ΔW1 x (spec Eq. 6 cross term)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 16, dtype=torch.float64) / 4)
        self.w2 = nn.Parameter(torch.randn(8, 24, dtype=torch.float64) / 5)

    def forward(self, x):
        return x @ self.w1.T @ self.w2.T


def test_known_second_order_term_is_recovered():
    torch.manual_seed(0)
    toy = Bilinear()
    before = {k: v.detach() for k, v in toy.named_parameters()}
    after = _perturbed(before, 0.05, seed=4)
    x = torch.randn(5, 16, dtype=torch.float64)
    result = branch_linearization(toy, x, before, after)
    d1, d2 = after["w1"] - before["w1"], after["w2"] - before["w2"]
    exact_nl = x @ d1.T @ d2.T
    exact_lin = x @ d1.T @ before["w2"].T + x @ before["w1"].T @ d2.T
    assert torch.allclose(result.nonlin_norm, exact_nl.norm(), rtol=1e-10)
    assert torch.allclose(result.lin_norm, exact_lin.norm(), rtol=1e-10)
    assert torch.allclose(result.branch_norm, (x @ before["w1"].T @ before["w2"].T).norm(), rtol=1e-12)


def test_float32_inputs_are_evaluated_in_float64():
    # A float32 model measured at float64 must give the same ratio as the model cast to float64 first.
    torch.manual_seed(0)
    toy = Bilinear().float()
    before = {k: v.detach() for k, v in toy.named_parameters()}
    after = _perturbed(before, 1e-3, seed=5)
    x = torch.randn(5, 16)
    r32 = branch_linearization(toy, x, before, after, dtype=torch.float64)
    r64 = branch_linearization(toy.double(), x.double(), {k: v.double() for k, v in before.items()},
                               {k: v.double() for k, v in after.items()})
    assert torch.allclose(r32.lin_ratio, r64.lin_ratio, rtol=1e-9)


# --- float32 evaluation behind a measured round-off floor (probes/linearization.py docstring) ------------


def test_float32_nl_of_a_branch_linear_in_its_parameters_is_flagged_as_roundoff():
    # nl is exactly zero for y = W x + b, so whatever float32 returns is round-off: the floor must say so
    # (a floor measured too low would let it through as a number), and float64 gives ~1e-16.
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    before = {k: v.detach() for k, v in layer.named_parameters()}
    for scale in (1e-1, 1e-3, 1e-5):
        after = _perturbed(before, scale, seed=6)
        h = torch.randn(4, 8, 32)
        r = branch_linearization(layer, h, before, after, dtype=torch.float32)
        assert float(r.nonlin_floor) > 0 and bool(r.below_floor), scale
        assert torch.isnan(r.nonlin_norm) and torch.isnan(r.lin_ratio) and torch.isnan(r.nonlin_to_output)
        assert torch.isfinite(r.lin_norm) and torch.isfinite(r.branch_norm)
        exact = branch_linearization(layer, h, before, after)
        # float64 round-off ~1e-16 ‖F‖ (1.6e-12 of ‖lin‖ at the smallest update): no floor measured or needed.
        assert torch.isnan(exact.nonlin_floor) and not bool(exact.below_floor) and exact.lin_ratio < 1e-10


def test_float32_keeps_a_large_second_order_term_and_it_matches_the_exact_one():
    # F = W2 W1 x with a 5% update: nl = ΔW2 ΔW1 x exactly, far above float32 round-off.
    torch.manual_seed(0)
    toy = Bilinear().float()
    before = {k: v.detach() for k, v in toy.named_parameters()}
    after = _perturbed(before, 0.05, seed=7)
    x = torch.randn(5, 16)
    r = branch_linearization(toy, x, before, after, dtype=torch.float32)
    exact_nl = (x.double() @ (after["w1"] - before["w1"]).double().T @ (after["w2"] - before["w2"]).double().T).norm()
    assert not bool(r.below_floor)
    assert float(r.nonlin_norm_raw) > 1e3 * float(r.nonlin_floor)
    assert abs(float(r.nonlin_norm) / float(exact_nl) - 1) < 1e-4


@pytest.mark.parametrize("branch_name", ["attn_branch", "mlp_branch"])
def test_parameter_jvp_is_bitwise_torch_func_jvp(gpt, branch_name):
    # parameter_jvp uses forward_ad's dual tensors directly (for speed): the same forward-mode formulas
    # as torch.func.jvp given the same tangents (h: explicit zeros), so the same bits, not just close.
    branch, params, direction, h = _branch_problem(gpt, 1, branch_name, seed=5)
    with gpt.attention_backend("math"), torch.no_grad():
        out, tangent = parameter_jvp(branch, h, params, direction)
        out_ref, tangent_ref = torch.func.jvp(lambda p, x: torch.func.functional_call(branch, p, (x,)),
                                              (params, h), (direction, torch.zeros_like(h)))
    assert torch.equal(out, out_ref) and torch.equal(tangent, tangent_ref)


def test_branch_linearization_is_bitwise_its_per_tensor_formula(gpt):
    # The foreach Δθ and θ + Δθ must give exactly what one op per tensor gives (float32 parameters cast
    # to float64 first, as in a run), and the norms those of nl = F(θ+Δθ) − F(θ) − JΔθ computed here.
    branch = gpt.blocks[0].mlp_branch
    before = {k: v.detach().float() for k, v in branch.named_parameters()}
    after = {k: v.float() for k, v in _perturbed({k: v.double() for k, v in before.items()}, 1e-3, seed=7).items()}
    h = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(8))
    result = branch_linearization(branch, h, before, after)
    theta = {k: v.double() for k, v in before.items()}
    delta = {k: after[k].double() - theta[k] for k in theta}
    with torch.no_grad():
        out, lin = torch.func.jvp(lambda p, x: torch.func.functional_call(branch, p, (x,)),
                                  (theta, h.double()), (delta, torch.zeros_like(h.double())))
        moved = torch.func.functional_call(branch, {k: theta[k] + delta[k] for k in theta}, (h.double(),))
    assert torch.equal(result.branch_norm, out.norm())
    assert torch.equal(result.lin_norm, lin.norm())
    assert torch.equal(result.nonlin_norm_raw, (moved - out - lin).norm())


class TiedPair(nn.Module):
    """Two names for one weight (as a tied embedding and head): F(x) = W (W x)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8, bias=False, dtype=torch.float64)
        self.second = nn.Linear(8, 8, bias=False, dtype=torch.float64)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


def test_call_with_resolves_ties_only_where_a_module_has_them(gpt):
    from probes.linearization import call_with, ties_tensors

    tied = TiedPair()
    w = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = torch.randn(3, 8, dtype=torch.float64)
    assert ties_tensors(tied) and not ties_tensors(gpt.blocks[0].mlp_branch)
    # one value given under one name reaches both uses of the tied weight: W (W x), as functional_call
    assert torch.equal(call_with(tied, {"first.weight": w}, x), x @ w.T @ w.T)
    branch, params, _, h = _branch_problem(gpt, 0, "mlp_branch", seed=11)
    assert torch.equal(call_with(branch, params, h), torch.func.functional_call(branch, params, (h,)))

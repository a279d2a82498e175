"""Feature change since θ_0 and linear CKA, checked against direct recomputations on the real model."""

import torch

from probes.adapters import GPTAdapter
from probes.feature_change import FeatureChange, linear_cka
from probes.hooks import SiteSpec, capture
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization


def _model(seed: int = 0, depth: int = 2) -> GPT:
    torch.manual_seed(seed)
    return GPT(Parameterization(name="alpha", width=32, depth=depth, d_head=16, base_width=32), ModelConfig(seq_len=16))


def _cka_by_centring_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Independent form: HSIC with the centring matrix H and Gram matrices K = X Xᵀ (Kornblith et al. 2019).
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (kx * ky).sum() / (kx.norm() * ky.norm())


def test_linear_cka_matches_definition_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(40, 9, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 0.3 * noise
    assert torch.allclose(linear_cka(x, y), _cka_by_centring_matrix(x, y))  # feature-space path (n > d)
    assert torch.allclose(linear_cka(x[:4], y[:4]), _cka_by_centring_matrix(x[:4], y[:4]))  # Gram path (n < d)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert torch.allclose(linear_cka(x, 3.0 * x @ q), torch.tensor(1.0, dtype=torch.float64))
    assert linear_cka(x, noise) < 0.5


def test_feature_change_against_the_models_own_activations():
    model = _model()
    adapter = GPTAdapter(model)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = FeatureChange(adapter)
    probe.set_reference(theta0)
    # Unchanged parameters: no change, CKA 1.
    with torch.no_grad(), model.attention_backend("math"), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    out = probe.measure(dict(acts), theta0)
    assert torch.all(out["feature_change"] == 0) and torch.allclose(out["feature_cka"], torch.ones(2, 2,
                                                                                                   dtype=torch.float64))
    # Move the blocks' weights, then compare with the hidden activations read from the real model's forward.
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    internal = {(l, k): s for l in range(2) for k, s in adapter.internal_sites(l).items()}
    with torch.no_grad(), model.attention_backend("math"), capture({**adapter.sites(), **internal}) as acts_t:
        adapter.loss(batch)
    now = {n: p.detach() for n, p in model.named_parameters()}
    out = probe.measure({k: v for k, v in acts_t.items() if k[1] not in ("mlp_hidden", "attn_mix", "attn_probs",
                                                                        "attn_logits")}, now)
    # φ(h; θ_0): the model at θ_0 with the block input forced to the θ_t stream h, via the MLP module itself.
    model0 = _model()
    for layer in range(2):
        block0 = model0.blocks[layer]
        with torch.no_grad(), capture({"hid": SiteSpec(block0.mlp_branch.proj, "input")}) as ref:
            block0.mlp_branch(acts_t[(layer, "resid_mid")])
        phi_t, phi_0 = acts_t[(layer, "mlp_hidden")].double(), ref["hid"].double()
        expected = (phi_t - phi_0).norm() / phi_0.norm()
        assert torch.allclose(out["feature_change"][layer, 1], expected, rtol=1e-5)
        assert torch.allclose(out["feature_cka"][layer, 1], linear_cka(phi_t, phi_0), rtol=1e-6)
        assert 0 < out["feature_change"][layer, 0] and out["feature_cka"][layer, 0] < 1
        assert 0 < out["attn_pattern_change"][layer] < 1


def test_feature_change_is_first_order_and_one_minus_cka_second_order():
    # δ ∝ ε and 1 − CKA ∝ ε² for a parameter move of size ε: the theory's "first/second order".
    model = _model(depth=1)
    adapter = GPTAdapter(model)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    theta0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    model.double()
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    probe = FeatureChange(adapter)
    probe.set_reference(theta0)
    direction = {n: torch.randn_like(p) for n, p in theta0.items()}
    deltas, gaps = [], []
    for eps in (1e-3, 1e-4):
        out = probe.measure(dict(acts), {n: theta0[n] + eps * direction[n] for n in theta0})
        deltas.append(out["feature_change"][0, 1].item())
        gaps.append(1 - out["feature_cka"][0, 1].item())
    assert abs(deltas[0] / deltas[1] - 10) < 0.1
    assert abs(gaps[0] / gaps[1] - 100) < 2

"""Training-health statistics against direct recomputations on a real model and a real optimizer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.adapters import GPTAdapter
from probes.health import POWER_STEPS, attention_reductions, power_iteration
from probes.hooks import capture, count_hooks
from probes.schema import BLOCK_ROLES, GLOBAL_ROLES, SITES
from probes.session import ProbeSession
from trainer.data import DataConfig, TokenData
from trainer.model import GPT, ModelConfig
from trainer.optim import build_optimizer
from trainer.parameterization import Parameterization

WIDTH, DEPTH, D_HEAD, SEQ = 64, 2, 16, 32


@pytest.fixture(scope="module")
def probed():
    """A tiny CompleteP GPT trained 4 AdamW steps with the probes on every step."""
    torch.manual_seed(0)
    param = Parameterization(name="alpha", alpha=1.0, width=WIDTH, depth=DEPTH, base_width=WIDTH, d_head=D_HEAD,
                             lr_base=2**-6)
    model = GPT(param, ModelConfig(seq_len=SEQ))
    optimizer = build_optimizer(model, param, model.parameter_roles())
    data = TokenData(DataConfig(), seq_len=SEQ)
    batch = data.probe_batch(4)
    session = ProbeSession(GPTAdapter(model), batch, torch.float64, lin_batch_size=1)
    rows, before, after = [], [], []
    for step in range(4):
        b = data.train_batch(seed=0, step=step, batch_size=4)
        model(b[:, :-1], b[:, 1:]).backward()
        session.before_update(step)
        before.append({n: p.detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
        rows.append({k: v.detach().clone() for k, v in session.after_update(step, optimizer).items()})
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, batch, rows, before, after


def _stream_at_theta(model, params, batch):
    """Site activations of a forward at the given parameters (a fresh model copy, no probes involved)."""
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(params)
    with torch.no_grad(), capture(GPTAdapter(clone).sites()) as acts:
        clone(batch[:, :-1])
    return clone, {k: v.clone() for k, v in acts.items()}


def test_attention_logits_and_entropy_match_a_hand_computation_from_the_qk_weights(probed):
    model, _, batch, rows, before, _ = probed
    step = 3
    clone, acts = _stream_at_theta(model, before[step], batch)
    heads = WIDTH // D_HEAD
    assert rows[step]["attn_max_logit"].shape == (DEPTH, heads)
    for layer, block in enumerate(clone.requires_grad_(False).blocks):
        ln, attn = block.attn_branch.ln, block.attn_branch.attn
        x = acts[(layer, "resid_pre")].double()
        h = F.layer_norm(x, (WIDTH,), ln.weight.double(), ln.bias.double(), ln.eps)
        w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
        q = h @ w[:WIDTH].T + b[:WIDTH]
        k = h @ w[WIDTH:2 * WIDTH].T + b[WIDTH:2 * WIDTH]
        t = x.shape[1]
        q = q.view(-1, t, heads, D_HEAD).transpose(1, 2)
        k = k.view(-1, t, heads, D_HEAD).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * model.param.attention_scale
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        expected_max = scores.masked_fill(~causal, -np.inf).amax(dim=(0, 2, 3))
        p = scores.masked_fill(~causal, -np.inf).softmax(-1).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)  # (b, h, t)
        norm = ent[:, :, 1:] / np.log(np.arange(2, t + 1))
        np.testing.assert_allclose(rows[step]["attn_max_logit"][layer].numpy(), expected_max.numpy(), rtol=1e-4)
        np.testing.assert_allclose(rows[step]["attn_entropy"][layer].numpy(), ent.mean(axis=(0, 2)), rtol=1e-4)
        np.testing.assert_allclose(rows[step]["attn_entropy_norm"][layer].numpy(), norm.mean(axis=(0, 2)), rtol=1e-4)
    assert count_hooks(model) == 0
    assert model.blocks[0].attn_branch.attn.backend == "sdpa"  # the probe restored the training path


def test_attention_reductions_on_known_patterns():
    t = 5
    logits = torch.zeros(1, 2, t, t)  # head 0: uniform causal attention
    logits[0, 1] = torch.eye(t) * 1e4  # head 1: each query attends to itself only
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mx, ent, norm = attention_reductions(logits.masked_fill(~causal, float("-inf")))
    assert mx.tolist() == [0.0, 1e4]
    np.testing.assert_allclose(ent[0].item(), np.mean(np.log(np.arange(1, t + 1))), rtol=1e-6)
    np.testing.assert_allclose(norm.tolist(), [1.0, 0.0], atol=1e-6)


def test_activation_outlier_statistics_match_numpy_on_the_probe_batch(probed):
    model, _, batch, rows, before, _ = probed
    step = 2
    _, acts = _stream_at_theta(model, before[step], batch)
    for layer in range(DEPTH):
        for j, site in enumerate(SITES):
            x = acts[(layer, site)].double().numpy().ravel()
            c = x - x.mean()
            kurt = (c**4).mean() / (c**2).mean() ** 2
            rms = np.sqrt((x**2).mean())
            np.testing.assert_allclose(rows[step]["act_absmax"][layer, j].item(), np.abs(x).max(), rtol=1e-5)
            np.testing.assert_allclose(rows[step]["act_kurtosis"][layer, j].item(), kurt, rtol=1e-3)
            assert rows[step]["act_outlier_frac"][layer, j].item() == pytest.approx((np.abs(x) > 6 * rms).mean())


def test_internal_site_statistics_match_a_hand_computed_mlp_hidden_layer(probed):
    model, _, batch, rows, before, _ = probed
    step = 1
    clone, acts = _stream_at_theta(model, before[step], batch)
    for layer, block in enumerate(clone.requires_grad_(False).blocks):
        mlp = block.mlp_branch
        x = acts[(layer, "resid_mid")].double()
        h = F.layer_norm(x, (WIDTH,), mlp.ln.weight.double(), mlp.ln.bias.double(), mlp.ln.eps)
        hidden = F.gelu(h @ mlp.fc.weight.double().T + mlp.fc.bias.double()).numpy().ravel()
        c = hidden - hidden.mean()
        j = 1  # INTERNAL_SITES: attn_mix, mlp_hidden
        np.testing.assert_allclose(rows[step]["internal_absmax"][layer, j].item(), np.abs(hidden).max(), rtol=1e-5)
        np.testing.assert_allclose(rows[step]["internal_kurtosis"][layer, j].item(),
                                   (c**4).mean() / (c**2).mean() ** 2, rtol=1e-3)
    assert torch.isfinite(rows[step]["internal_absmax"]).all()


def test_adam_state_statistics_match_the_optimizer_state(probed):
    model, optimizer, _, rows, _, _ = probed
    row = rows[-1]  # after the last update, which is the state the optimizer holds now
    roles = {n: r.value for n, r in model.parameter_roles().items()}
    params = dict(model.named_parameters())
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    beta2 = optimizer.param_groups[0]["betas"][1]
    for layer in range(DEPTH):
        for j, role in enumerate(BLOCK_ROLES):
            names = [n for n in params if roles[n] == role and n.startswith(f"blocks.{layer}.")]
            st = [optimizer.state[params[n]] for n in names]
            m = np.sqrt(sum((s["exp_avg"].double().numpy() ** 2).sum() for s in st))
            v = np.sqrt(sum((s["exp_avg_sq"].double().numpy() ** 2).sum() for s in st))
            dominated, total = 0, 0
            for n, s in zip(names, st):
                v_hat = s["exp_avg_sq"].double().numpy() / (1 - beta2 ** float(s["step"]))
                dominated += int((group[id(params[n])]["eps"] >= np.sqrt(v_hat)).sum())
                total += v_hat.size
            np.testing.assert_allclose(row["adam_m_norm"][layer, j].item(), m, rtol=1e-5)
            np.testing.assert_allclose(row["adam_v_norm"][layer, j].item(), v, rtol=1e-5)
            assert row["adam_eps_dominance"][layer, j].item() == pytest.approx(dominated / total)
    # The embedding's rows of bytes absent from the batches never got a gradient: ε dominates there.
    wte = optimizer.state[params["wte.weight"]]
    never = (wte["exp_avg_sq"].sum(1) == 0).double().mean().item()
    assert never > 0
    assert row["global_adam_eps_dominance"][GLOBAL_ROLES.index("embedding")].item() >= never


def test_spectral_statistics_match_matrix_norms(probed):
    model, _, _, rows, before, after = probed
    roles = {n: r.value for n, r in model.parameter_roles().items()}
    # The store's matrix coordinate: the hidden weights' names inside a block, in the model's order.
    matrices = [n.split(".", 2)[2] for n, r in roles.items() if r == "hidden_weight" and n.startswith("blocks.0.")]
    assert rows[0]["weight_spectral_norm"].shape == (DEPTH, len(matrices)) and len(matrices) == 4
    for step in (0, 3):  # cold start, then warm-started with POWER_STEPS steps
        for layer in range(DEPTH):
            for j, name in enumerate(matrices):
                full = f"blocks.{layer}.{name}"
                w, w1 = before[step][full].double(), after[step][full].double()
                sigma = torch.linalg.matrix_norm(w, ord=2).item()
                dsigma = torch.linalg.matrix_norm(w1 - w, ord=2).item()
                got = rows[step]["weight_spectral_norm"][layer, j].item()
                assert got <= sigma * (1 + 1e-5)  # power iteration approaches from below
                np.testing.assert_allclose(got, sigma, rtol=0.03)
                np.testing.assert_allclose(rows[step]["update_spectral_rel"][layer, j].item(), dsigma / sigma,
                                           rtol=0.1)
                np.testing.assert_allclose(rows[step]["weight_stable_rank"][layer, j].item(),
                                           (w**2).sum().item() / sigma**2, rtol=0.07)


def test_power_iteration_converges_to_the_largest_singular_value():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    s = torch.linspace(3.0, 0.1, 30)
    w = u[:, :30] @ torch.diag(s) @ v.T
    sigma, vec = power_iteration(w, torch.ones(30) / 30**0.5, 50)
    assert sigma.item() == pytest.approx(3.0, rel=1e-4)
    warm, _ = power_iteration(w * 1.01, vec, POWER_STEPS)  # a slightly changed matrix, warm-started
    assert warm.item() == pytest.approx(3.03, rel=1e-4)


def test_without_an_optimizer_the_adam_state_is_nan():
    torch.manual_seed(0)
    param = Parameterization(name="sp", width=32, depth=1, base_width=32, d_head=16)
    model = GPT(param, ModelConfig(seq_len=8))
    session = ProbeSession(GPTAdapter(model), torch.randint(0, 256, (2, 9)))
    session.before_update(0)
    values = session.after_update(0)
    assert torch.isnan(values["adam_eps_dominance"]).all()
    assert torch.isfinite(values["attn_max_logit"]).all()


def test_attention_and_activation_statistics_follow_their_own_cadence():
    torch.manual_seed(0)
    param = Parameterization(name="sp", width=32, depth=2, base_width=32, d_head=16)
    model = GPT(param, ModelConfig(seq_len=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    session = ProbeSession(GPTAdapter(model), batch, health_every=2)
    for step in range(4):
        model(batch[:, :-1], batch[:, 1:]).backward()
        session.before_update(step)
        optimizer.step()
        values = session.after_update(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        full = step % 2 == 0
        for name in ("attn_max_logit", "attn_entropy_norm", "act_absmax", "act_kurtosis", "internal_absmax",
                     "adam_v_norm", "global_adam_eps_dominance", "weight_spectral_norm", "update_spectral_rel"):
            assert torch.isfinite(values[name]).all() == full and torch.isnan(values[name]).all() != full, name
        assert values["attn_max_logit"].shape == (2, 2) and values["weight_spectral_norm"].shape == (2, 4)

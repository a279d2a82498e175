"""The GPT as built from a Parameterization: init per role, hook-site identities, attention
backends, role coverage of parameters and optimizer groups, tied embeddings."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from trainer.model import GPT, ModelConfig
from trainer.optim import build_optimizer, check_coverage, param_groups
from trainer.parameterization import Parameterization, Role

SEQ = 16


def gpt(name="alpha", alpha=1.0, width=64, depth=2, base_width=64, base_depth=2, seed=0, tie_embeddings=False,
        **kw) -> GPT:
    """A tiny GPT (d_head 32); `kw` goes to the Parameterization."""
    p = Parameterization(name=name, alpha=alpha, width=width, depth=depth, base_width=base_width,
                         base_depth=base_depth, d_head=32, **kw)
    torch.manual_seed(seed)
    return GPT(p, ModelConfig(seq_len=SEQ, tie_embeddings=tie_embeddings))


def batch(seed=1, b=4, t=SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(256, (b, t + 1), generator=g)


def expected_role(name: str) -> Role:
    """The role of a parameter, read off its name by hand (independent of parameter_roles)."""
    if name == "wte.weight":
        return Role.EMBEDDING
    if name == "wpe.weight":
        return Role.POSITION_EMBEDDING
    if name.startswith("ln_f."):
        return Role.FINAL_NORM
    if name == "lm_head.weight":
        return Role.UNEMBEDDING
    assert name.startswith("blocks."), name
    if ".ln." in name:
        return Role.BLOCK_NORM
    return Role.HIDDEN_WEIGHT if name.endswith(".weight") else Role.HIDDEN_BIAS


# --- base shape: µP and every α are the same model -------------------------------------------------


def test_base_shape_mup_and_alphas_are_bitwise_identical():
    # At width = base_width and depth = base_depth every Table 1 factor is exactly 1, so µP, α = 0.5 and
    # α = 1 must build the same tensors from the same seed and take the same first AdamW step.
    x = batch()
    results = {}
    for name, alpha in (("mup", 1.0), ("alpha", 0.5), ("alpha", 1.0)):
        model = gpt(name, alpha, wd_base=0.1)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = build_optimizer(model, model.param, model.parameter_roles())
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        results[(name, alpha)] = (init, loss.detach(), model.state_dict())
    (init0, loss0, after0), *others = results.values()
    for init, loss, after in others:
        assert init.keys() == init0.keys()
        assert all(torch.equal(init[k], init0[k]) for k in init0)
        assert torch.equal(loss, loss0)
        assert all(torch.equal(after[k], after0[k]) for k in after0)
    # ...and the step did change the parameters (not a vacuous comparison).
    assert not torch.equal(after0["blocks.0.mlp_branch.fc.weight"], init0["blocks.0.mlp_branch.fc.weight"])


def test_sp_differs_from_mup_at_base_shape_only_in_attention_scale():
    sp, mup = gpt("sp"), gpt("mup")
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))
    assert sp.blocks[0].attn_branch.attn.scale == 1 / math.sqrt(32)
    assert mup.blocks[0].attn_branch.attn.scale == 1 / 32


# --- init per role -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "alpha"), [("sp", 1.0), ("mup", 1.0), ("alpha", 0.5)])
def test_measured_init_std_per_tensor_matches_table1(name, alpha):
    # Non-base shape: m_N = 2, m_L = 2. Hidden weights: σ·m_N^(−1/2) for µP/α, σ for SP; embeddings and
    # unembedding σ. Norm gains are 1, all biases 0.
    sigma, m_n = 0.02, 2.0
    model = gpt(name, alpha, width=128, depth=4, base_width=64, base_depth=2, seed=3)
    hidden = sigma if name == "sp" else sigma / math.sqrt(m_n)
    for pname, p in model.named_parameters():
        role = expected_role(pname)
        if role in (Role.BLOCK_NORM, Role.FINAL_NORM):
            if pname.endswith(".weight"):  # LN gains start at 1 (biases: see the test below)
                assert torch.equal(p, torch.ones_like(p)), pname
        elif role is Role.HIDDEN_BIAS:
            assert torch.equal(p, torch.zeros_like(p)), pname
        else:
            want = hidden if role is Role.HIDDEN_WEIGHT else sigma
            # The sample std of n iid normals has relative standard error ≈ 1/sqrt(2n); 5 s.e. makes a
            # false failure ~1e-6 per tensor, while the SP/µP difference here is 29% (≫ 5 s.e. ≤ 4%).
            n = p.numel()
            rel = abs(p.detach().double().std().item() / want - 1)
            assert rel < 5 / math.sqrt(2 * n), f"{pname}: std {p.std().item():.5g} vs {want:.5g}"
            assert abs(p.detach().double().mean().item()) < 5 * want / math.sqrt(n), pname


@pytest.mark.parametrize("name", ["sp", "alpha"])
def test_layernorm_biases_start_at_zero(name):
    # Spec §1, reference-code note 6 (and the parameterization module's docstring): LN gains start at 1
    # and LN biases at 0. A bias of 1 adds a constant vector to every branch input and to the logits' input.
    model = gpt(name)
    ln_biases = {n: p for n, p in model.named_parameters() if (".ln." in n or n.startswith("ln_f.")) and
                 n.endswith(".bias")}
    assert len(ln_biases) == 2 * 2 + 1  # two per block, one final
    for n, p in ln_biases.items():
        assert torch.equal(p, torch.zeros_like(p)), f"{n} starts at {p.flatten()[0].item()}"


def test_init_uses_role_not_default_pytorch_init():
    # PyTorch's default nn.Linear init is uniform with std 1/sqrt(3·fan_in) ≈ 0.07 at fan_in 64; the
    # table gives 0.02. Catch a model that forgot to re-initialize a module.
    model = gpt("sp")
    assert abs(model.blocks[0].attn_branch.attn.qkv.weight.std().item() - 0.02) < 0.002


# --- hook sites --------------------------------------------------------------------------------------


def capture(model: GPT) -> tuple[dict, list]:
    """Record the output of every hook site (embed, block sites, final)."""
    seen: dict = {}
    handles = [model.embed_hook.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", o)),
               model.final_hook.register_forward_hook(lambda m, i, o: seen.__setitem__("final", o))]
    for l, block in enumerate(model.blocks):
        for site, hp in block.hooks.items():
            handles.append(hp.register_forward_hook(lambda m, i, o, key=(l, site): seen.__setitem__(key, o)))
    return seen, handles


@pytest.mark.parametrize(("name", "alpha"), [("alpha", 1.0), ("alpha", 0.5), ("sp", 1.0)])
def test_stream_identities_at_hook_sites(name, alpha):
    model = gpt(name, alpha, depth=4, base_depth=2)
    mult = model.param.branch_multiplier
    assert mult == (0.5**alpha if name == "alpha" else 1.0)
    seen, handles = capture(model)
    with torch.no_grad():
        model(batch()[:, :-1])
    for h in handles:
        h.remove()
    L = len(model.blocks)
    for l in range(L):
        s = {site: seen[(l, site)] for site in model.blocks[l].SITES}
        # Exact equalities: each site records the very tensor the stream is built from.
        assert torch.equal(s["resid_mid"], s["resid_pre"] + s["attn_add"])
        assert torch.equal(s["resid_post"], s["resid_mid"] + s["mlp_add"])
        assert torch.equal(s["attn_add"], mult * s["attn_out"])
        assert torch.equal(s["mlp_add"], mult * s["mlp_out"])
        # The raw branch output is what the branch module computes from the stream it receives.
        with torch.no_grad():
            assert torch.equal(s["attn_out"], model.blocks[l].attn_branch(s["resid_pre"]))
            assert torch.equal(s["mlp_out"], model.blocks[l].mlp_branch(s["resid_mid"]))
        if l > 0:
            assert torch.equal(s["resid_pre"], seen[(l - 1, "resid_post")])
    assert torch.equal(seen["embed"], seen[(0, "resid_pre")])
    assert torch.equal(seen["final"], seen[(L - 1, "resid_post")])


def test_output_multiplier_scales_logits():
    model = gpt("mup", width=128, base_width=64)
    x = batch()[:, :-1]
    with torch.no_grad():
        final = model.blocks[1](model.blocks[0](model.embed(x)))
        logits = model(x)
        assert torch.allclose(logits, model.lm_head(model.ln_f(final)) / 2.0, rtol=0, atol=1e-7)


# --- attention backends ------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", ["sp", "alpha"])
def test_math_and_sdpa_attention_agree(name, dtype, tol):
    model = gpt(name, sigma_base=0.2).to(dtype)  # larger σ: non-trivial attention patterns
    x = batch()[:, :-1]
    with torch.no_grad():
        fused = model(x)
        with model.attention_backend("math"):
            assert model.blocks[0].attn_branch.attn.backend == "math"
            explicit = model(x)
    assert model.blocks[0].attn_branch.attn.backend == "sdpa"  # the context manager restores it
    assert fused.dtype == dtype
    torch.testing.assert_close(explicit, fused, rtol=tol, atol=tol)
    assert fused.std() > 0.1  # logits far from constant: the comparison is not trivial


def test_math_attention_is_causal():
    model = gpt(sigma_base=0.2)
    model.set_attention_backend("math")
    x = batch()[:, :-1]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256  # change only the last token
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="flash"):
        gpt().set_attention_backend("flash")


# --- roles and optimizer groups ----------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_roles_and_groups_cover_every_parameter_once(tie):
    model = gpt(width=128, depth=3, base_width=64, wd_base=0.1, tie_embeddings=tie)
    roles = model.parameter_roles()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(roles) == sorted(names)
    assert {n: expected_role(n) for n in names} == roles
    opt = build_optimizer(model, model.param, roles)
    counts = Counter(id(p) for g in opt.param_groups for p in g["params"])
    assert set(counts) == {id(p) for p in model.parameters()}
    assert set(counts.values()) == {1}
    # Each group carries its role's Table 1 values.
    by_name = {g["name"]: g for g in opt.param_groups}
    for role in set(roles.values()):
        rule = model.param.rule(role)
        g = by_name[role.value]
        assert (g["lr"], g["lr_peak"], g["weight_decay"], g["eps"]) == (rule.lr, rule.lr, rule.weight_decay, rule.eps)
        assert {id(p) for p in g["params"]} == {id(p) for n, p in model.named_parameters() if roles[n] is role}


def test_check_coverage_names_a_parameter_without_role():
    model = gpt()
    roles = model.parameter_roles()
    model.blocks[1].stray = nn.Parameter(torch.zeros(3))  # e.g. a gate someone added later
    with pytest.raises(AssertionError, match=r"blocks\.1\.stray"):
        param_groups(model, model.param, roles)
    with pytest.raises(AssertionError, match=r"blocks\.1\.stray"):
        build_optimizer(model, model.param, roles)


def test_parameter_roles_names_a_parameter_without_role():
    model = gpt()
    model.blocks[1].stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(AssertionError, match=r"blocks\.1\.stray"):
        model.parameter_roles()


def test_check_coverage_names_an_unknown_role_entry():
    model = gpt()
    roles = {**model.parameter_roles(), "ghost.weight": Role.HIDDEN_WEIGHT}
    with pytest.raises(AssertionError, match=r"ghost\.weight"):
        check_coverage(dict(model.named_parameters()), roles)


def test_tied_embeddings_share_one_tensor():
    tied = gpt(tie_embeddings=True)
    assert tied.lm_head.weight is tied.wte.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert tied.parameter_roles()["wte.weight"] is Role.EMBEDDING  # one role, one optimizer group
    # An untied copy with equal values: same loss, and the shared tensor's gradient is the sum of the
    # gradients of its two uses (embedding lookup and unembedding).
    untied = gpt(tie_embeddings=False)
    untied.load_state_dict(tied.state_dict())  # the tied state_dict lists the shared tensor under both names
    x = batch()
    loss_tied, loss_untied = tied(x[:, :-1], x[:, 1:]), untied(x[:, :-1], x[:, 1:])
    assert torch.equal(loss_tied, loss_untied)
    loss_tied.backward()
    loss_untied.backward()
    torch.testing.assert_close(tied.wte.weight.grad, untied.wte.weight.grad + untied.lm_head.weight.grad)
    # A step moves the one tensor: the head still is the embedding.
    build_optimizer(tied, tied.param, tied.parameter_roles()).step()
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert tied.num_params() == untied.num_params()  # the non-embedding count excludes the head either way


def test_forward_rejects_too_long_sequences():
    with pytest.raises(ValueError, match=str(SEQ + 1)):
        gpt()(torch.zeros(1, SEQ + 1, dtype=torch.long))

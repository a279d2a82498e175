"""`probes.audit_model.audit`: a model and optimizer built elsewhere, checked against Table 1 (+ Eq. 40).

The correctly built model is the toolkit's own GPT with the trainer's optimizer (an independent
construction path); the wrong ones break one rule each, as real training code does.
"""

import math

import pytest
import torch

from probes.audit_model import audit, expected_eps
from trainer.model import GPT, ModelConfig
from trainer.optim import build_optimizer
from trainer.parameterization import Parameterization, Role

SMALL = ModelConfig(seq_len=16)


def built(width: int = 64, depth: int = 4, alpha: float = 1.0, optimizer_depth: int | None = None):
    """Our GPT at (width, depth) from base (64, 2), and the trainer's AdamW; `optimizer_depth` builds the
    groups for another depth (the 'forgot the depth factor' bug)."""
    torch.manual_seed(0)
    kw = dict(name="alpha", alpha=alpha, width=width, base_width=64, base_depth=2, lr_base=1e-3, wd_base=0.1,
              eps_base=1e-8)
    param = Parameterization(depth=depth, **kw)
    model = GPT(param, SMALL)
    groups_param = param if optimizer_depth is None else Parameterization(depth=optimizer_depth, **kw)
    return model, build_optimizer(model, groups_param, model.parameter_roles()), param


def wrong(result, quantity: str) -> dict[str, list[str]]:
    return {m.role: m.names for m in result.mismatches if m.quantity == quantity}


def test_a_correctly_built_model_is_clean_and_its_base_values_are_recovered():
    model, optimizer, param = built()
    result = audit(model, optimizer, "completep", base_width=64, base_depth=2)
    assert result.ok, result.lines()
    p = result.parameterization
    assert (p.width, p.depth, p.m_l) == (64, 4, 2.0)
    assert math.isclose(p.lr_base, 1e-3) and math.isclose(p.wd_base, 0.1) and math.isclose(p.eps_base, 1e-8)
    assert abs(p.sigma_base / 0.02 - 1) < 0.05  # measured on the embedding
    # Eq. 40 by hand at m_N = 1, m_L = 2, α = 1: blocks ε_base/2, outside ε_base.
    assert math.isclose(expected_eps(p, Role.HIDDEN_WEIGHT), 0.5e-8)
    assert math.isclose(expected_eps(p, Role.EMBEDDING), 1e-8)


def test_a_global_eps_is_caught_on_every_block_role():
    model, optimizer, _ = built()
    for g in optimizer.param_groups:
        g["eps"] = 1e-8  # the authors' bug: one ε for all groups
    found = wrong(audit(model, optimizer, "completep", base_width=64, base_depth=2), "eps")
    assert set(found) == {"block_norm", "hidden_weight", "hidden_bias"}
    assert "blocks.3.attn_branch.attn.qkv.weight" in found["hidden_weight"]


def test_a_missing_depth_lr_factor_is_caught():
    # α = 0.5: block LRs carry m_L^(α−1) = 2^-0.5; groups built for depth 2 leave it out.
    model, optimizer, _ = built(alpha=0.5, optimizer_depth=2)
    found = wrong(audit(model, optimizer, "alpha", base_width=64, base_depth=2, alpha=0.5), "lr")
    assert set(found) == {"block_norm", "hidden_weight", "hidden_bias"}


def test_a_width_blind_init_is_caught_with_the_tensor_names():
    model, optimizer, param = built(width=128)  # m_N = 2: hidden std σ/√2
    with torch.no_grad():
        model.blocks[1].mlp_branch.fc.weight.normal_(0.0, 0.02)  # SP init left in one matrix
        model.blocks[0].attn_branch.ln.weight.fill_(0.5)
    result = audit(model, optimizer, "completep", base_width=64, base_depth=2)
    assert wrong(result, "init_std") == {"hidden_weight": ["blocks.1.mlp_branch.fc.weight"]}
    assert wrong(result, "init") == {"block_norm": ["blocks.0.attn_branch.ln.weight"]}


def test_a_hugging_face_llama_with_one_adamw_group():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    result = audit(model, optimizer, "completep", base_width=32, base_depth=2)
    found = wrong(result, "lr")
    assert "model.layers.3.self_attn.k_proj.weight" in found["hidden_weight"]  # GQA projection: hidden weight
    # ε_base is read off the embedding (Eq. 40: ε_emb = ε_base/m_N), so the final norm and unembedding
    # agree with it; the blocks want another m_L^-1 = 1/2.
    assert set(wrong(result, "eps")) == {"block_norm", "hidden_weight"}
    assert "hidden_weight" in wrong(result, "init_std")  # HF's σ = 0.02 at every width
    with pytest.raises(ValueError, match="do not cover the model.*missing.*lm_head.weight"):
        audit(model, [{"params": list(model.model.parameters()), "lr": 1e-3, "eps": 1e-8, "weight_decay": 0.0}])

"""Attention health on a Hugging Face GPT-2 through the attention-function registry (no download)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the Hugging Face test needs the optional 'hf' extra")

from probes.adapters import adapter_for  # noqa: E402
from probes.health import attention_statistics  # noqa: E402
from probes.hooks import capture, count_hooks  # noqa: E402
from probes.probe_attention import PROBE_ATTENTION  # noqa: E402
from probes.session import ProbeSession  # noqa: E402

WIDTH, HEADS = 64, 4


def test_gpt2_attention_logits_match_a_hand_computation_from_c_attn():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=WIDTH, n_layer=2, n_head=HEADS,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = transformers.GPT2LMHeadModel(config).train()  # dropout on: the probes must switch it off
    adapter = adapter_for(model)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session = ProbeSession(adapter, batch)
    adapter.loss(batch).backward()
    session.before_update(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    values = session.after_update(0, optimizer)
    rng = torch.get_rng_state()
    again = attention_statistics(adapter, session.prev, batch, before)  # the probe's extra forward alone
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # no dropout, no RNG use; mode restored
    torch.testing.assert_close(again["attn_max_logit"], values["attn_max_logit"], rtol=0, atol=0)
    model.eval()
    assert model.config._attn_implementation != PROBE_ATTENTION and count_hooks(model) == 0
    model.load_state_dict(before, strict=False)  # θ_0, where the probe measured
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    d = WIDTH // HEADS
    for layer, block in enumerate(model.transformer.h):
        h = F.layer_norm(acts[(layer, "resid_pre")].double(), (WIDTH,), block.ln_1.weight.double(),
                         block.ln_1.bias.double(), block.ln_1.eps)
        qkv = h @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()
        q, k = (qkv[..., i * WIDTH:(i + 1) * WIDTH].view(2, 16, HEADS, d).transpose(1, 2) for i in (0, 1))
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        expected = scores.masked_fill(~causal, -np.inf).amax(dim=(0, 2, 3)).detach()
        np.testing.assert_allclose(values["attn_max_logit"][layer].numpy(), expected.numpy(), rtol=1e-4)
        p = scores.masked_fill(~causal, -np.inf).softmax(-1).detach()
        entropy = -torch.special.xlogy(p, p).sum(-1).mean(dim=(0, 2))
        np.testing.assert_allclose(values["attn_entropy"][layer].numpy(), entropy.numpy(), rtol=1e-4)

"""The probe attention (probes.probe_attention) against torch's own scaled-dot-product attention."""

import pytest
import torch

from probes.probe_attention import probe_attention_forward


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_probe_attention_is_sdpa_in_float64_with_grouped_kv_heads(mask_kind):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=gen) for _ in range(2))  # 2 kv heads for 4
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    mask = causal if mask_kind == "bool" else torch.zeros(causal.shape, dtype=torch.float64).masked_fill(
        ~causal, torch.finfo(torch.float64).min)
    module = torch.nn.Module().eval()
    out, probs = probe_attention_forward(module, q, k, v, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                                enable_gqa=True).transpose(1, 2)
    assert out.dtype == probs.dtype == torch.float64  # the softmax stays in float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert torch.all(probs.triu(1) == 0)

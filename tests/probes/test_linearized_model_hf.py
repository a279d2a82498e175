"""The block-linearized model through another adapter: a Hugging Face GPT-2 built from a config."""

import copy

import pytest
import torch

from probes.hooks import capture

transformers = pytest.importorskip("transformers", reason="needs the optional 'hf' extra")

from probes.adapters import HFGPT2Adapter  # noqa: E402
from probes.linearized_model import BlockLinearizedModel  # noqa: E402


@pytest.mark.xfail(strict=True, reason="HFGPT2Adapter.branch calls the attention without the kwargs the model "
                   "passes it (the eager path gets a causal attention_mask), so the replayed branch differs from the "
                   "model's; the adapter rework replays the recorded args/kwargs (DESIGN.md), then this passes")
def test_hf_surrogate_is_the_model_at_init_and_second_order_after():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))

    def real_stream(m):
        m = copy.deepcopy(m).double()
        adapter = HFGPT2Adapter(m)
        with torch.no_grad(), adapter.linearizable(), capture({"x": adapter.sites()[(-1, "final_stream")]}) as s:
            adapter.loss(batch)
        return s["x"]

    _, lin = BlockLinearizedModel(HFGPT2Adapter(model), theta0).loss(batch, range(2), final_stream=True)
    assert torch.allclose(lin, real_stream(model), rtol=0, atol=1e-10)
    direction = {n: torch.randn_like(p) for n, p in theta0.items()}
    gaps = []
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta0[n] + eps * direction[n])
        _, lin = BlockLinearizedModel(HFGPT2Adapter(model), theta0).loss(batch, range(2), final_stream=True)
        gaps.append(float((lin - real_stream(model)).norm()))
    assert 70 < gaps[0] / gaps[1] < 130  # ε²

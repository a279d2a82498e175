"""The built-in GPT's adapter: internal sites (the contract's `mlp_hidden` and `attn_mix`)."""

import torch

from probes.adapters import GPTAdapter, adapter_for
from probes.hooks import capture, count_hooks
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization


def test_internal_sites_are_the_inputs_of_the_output_projections():
    torch.manual_seed(0)
    model = GPT(Parameterization(width=64, depth=2, base_width=64), ModelConfig(seq_len=16))
    adapter = adapter_for(model)
    assert isinstance(adapter, GPTAdapter)
    sites = {**adapter.sites(), **{(l, k): s for l in range(2) for k, s in adapter.internal_sites(l).items()}}
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(sites) as acts:
        adapter.loss(batch)
    assert count_hooks(model) == 0
    for layer, block in enumerate(model.blocks):
        assert acts[(layer, "mlp_hidden")].shape == (2, 16, 256)  # 4N after the GELU
        torch.testing.assert_close(block.mlp_branch.proj(acts[(layer, "mlp_hidden")]), acts[(layer, "mlp_out")])
        torch.testing.assert_close(torch.nn.functional.gelu(block.mlp_branch.fc(block.mlp_branch.ln(
            acts[(layer, "resid_mid")]))), acts[(layer, "mlp_hidden")])
        torch.testing.assert_close(block.attn_branch.attn.proj(acts[(layer, "attn_mix")]), acts[(layer, "attn_out")])

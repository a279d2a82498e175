"""Probes on a model the toolkit did not build: a Hugging Face GPT-2 from a config (no download).

The branch and finite-difference checks for every family (GPT-2 included) are in test_adapter_families.py.
"""

import pytest
import torch

from probes.hooks import capture, count_hooks
from probes.schema import SITES

transformers = pytest.importorskip("transformers", reason="the GPT-2 adapter test needs the optional 'hf' extra")

from probes.adapters import HFGPT2Adapter, adapter_for  # noqa: E402
from probes.decoder import DecoderAdapter  # noqa: E402
from probes.session import ProbeSession  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=3, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def test_sites_satisfy_the_stream_identities(gpt2):
    adapter = adapter_for(gpt2)
    assert isinstance(adapter, DecoderAdapter) and adapter.spec == HFGPT2Adapter(gpt2).spec
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    assert count_hooks(gpt2) == 0
    for layer in range(adapter.depth):
        assert set(SITES) <= {s for (l, s) in acts if l == layer}
        torch.testing.assert_close(acts[(layer, "resid_mid")], acts[(layer, "resid_pre")] + acts[(layer, "attn_add")])
        torch.testing.assert_close(acts[(layer, "resid_post")], acts[(layer, "resid_mid")] + acts[(layer, "mlp_add")])


def test_probe_session_records_feature_updates_and_linearization(gpt2):
    adapter = HFGPT2Adapter(gpt2)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    session = ProbeSession(adapter, batch)
    optimizer = torch.optim.AdamW(gpt2.parameters(), lr=1e-3)
    values = []
    for step in range(3):
        adapter.loss(batch).backward()
        session.before_update(step)
        optimizer.step()
        values.append(session.after_update(step))
        optimizer.zero_grad()
    assert count_hooks(gpt2) == 0
    assert torch.all(values[0]["delta0_rms"] == 0)  # step 0 is the reference
    assert torch.all(values[2]["delta0_rms"][:, SITES.index("resid_post")] > 0)
    ratio = values[2]["lin_ratio"]
    assert ratio.shape == (3, 2) and torch.all(torch.isfinite(ratio)) and torch.all(ratio > 0)

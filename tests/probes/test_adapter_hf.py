"""Probes on a model the toolkit did not build: a Hugging Face GPT-2 from a config (no download)."""

import pytest
import torch

from probes.hooks import capture, count_hooks
from probes.linearization import finite_difference_jvp
from probes.schema import BRANCHES, SITES

transformers = pytest.importorskip("transformers", reason="the GPT-2 adapter test needs the optional 'hf' extra")

from probes.adapters import HFGPT2Adapter, adapter_for  # noqa: E402
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
    assert isinstance(adapter, HFGPT2Adapter)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    assert count_hooks(gpt2) == 0
    for layer in range(adapter.depth):
        assert set(SITES) <= {s for (l, s) in acts if l == layer}
        torch.testing.assert_close(acts[(layer, "resid_mid")], acts[(layer, "resid_pre")] + acts[(layer, "attn_add")])
        torch.testing.assert_close(acts[(layer, "resid_post")], acts[(layer, "resid_mid")] + acts[(layer, "mlp_add")])


def test_branch_jvp_matches_finite_difference(gpt2):
    adapter = HFGPT2Adapter(gpt2.double())
    h = torch.randn(2, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    try:
        for name in BRANCHES:
            branch, _ = adapter.branch(1, name)
            params = {k: v.detach() for k, v in branch.named_parameters()}
            gen = torch.Generator().manual_seed(3)
            direction = {k: 1e-2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
            with adapter.linearizable():
                fn = lambda p, branch=branch: torch.func.functional_call(branch, p, (h,))  # noqa: E731
                _, jvp_out = torch.func.jvp(fn, (params,), (direction,))
                fd = finite_difference_jvp(branch, h, params, direction)
            assert ((jvp_out - fd).norm() / jvp_out.norm()) < 1e-6, name
    finally:
        gpt2.float()


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

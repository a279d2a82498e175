"""Built-in statistics that are read off tables equal their per-item formulas.

`branch_to_stream` is now read off `act_rms` and the five linearization variables off one stacked
(layer, branch) table of results (fewer ops per probe step). Here both are recomputed one item at a
time, as the probes did before, from a real model's captured stream and real linearization results:
the same bits (the same elementwise ops on the same numbers). Every stream statistic is also checked
against a float64 recomputation in numpy (to float32 round-off, 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.adapters import GPTAdapter
from probes.hooks import capture
from probes.linearization import branch_linearization
from probes.schema import BRANCHES, EMBED_SITE, FINAL_SITE, SITES
from probes.statistics import ProbeContext, builtin_statistics
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

DEPTH = 3


def _stream(adapter, batch):
    with torch.enable_grad(), capture(adapter.sites()) as acts:
        loss = adapter.loss(batch)
        pre = [acts[(layer, "resid_pre")] for layer in range(adapter.depth)]
        grads = torch.autograd.grad(loss, pre)
    return {k: v.detach().clone() for k, v in acts.items()}, [g.detach() for g in grads], loss.detach()


def _moved(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def ctx() -> ProbeContext:
    torch.manual_seed(0)
    param = Parameterization(name="alpha", alpha=1.0, width=32, depth=DEPTH, base_width=32, d_head=16)
    model = GPT(param, ModelConfig(seq_len=16))
    model.eval()
    adapter = GPTAdapter(model)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    ref0, _, _ = _stream(adapter, batch)
    _moved(model, 2)
    prev, _, _ = _stream(adapter, batch)
    _moved(model, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    acts, grads, loss = _stream(adapter, batch)
    _moved(model, 4)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    lin = {}
    with adapter.linearizable():
        for layer in range(DEPTH):
            for name in BRANCHES:
                branch, site = adapter.branch(layer, name)
                local = {k: names[id(p)] for k, p in branch.named_parameters()}
                lin[(layer, name)] = branch_linearization(branch, acts[(layer, site)][:1],
                                                          {k: before[g] for k, g in local.items()},
                                                          {k: after[g] for k, g in local.items()})
    roles = adapter.parameter_roles()
    return ProbeContext(step=3, depth=DEPTH, acts=acts, ref0=ref0, prev=prev, grads=grads, probe_loss=loss,
                        linearization=lin, params_before=before, params_after=after, roles=roles,
                        layers={n: adapter.layer_of(n) for n in roles}, adapter=adapter)


def _rms(x):
    return x.float().pow(2).mean().sqrt()


def _per_item(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """branch_to_stream and the linearization variables one item at a time (the formulas before the tables)."""
    L, acts = ctx.depth, ctx.acts
    out = {"branch_to_stream": torch.stack([torch.stack([
        _rms(acts[(l, f"{b}_add")]) / _rms(acts[(l, ctx.branch_inputs[b])]) for b in BRANCHES]) for l in range(L)])}
    for name in ("branch_norm", "lin_norm", "nonlin_norm", "lin_ratio", "nonlin_to_output"):
        out[name] = torch.stack([torch.stack([getattr(ctx.linearization[(l, b)], name) for b in BRANCHES])
                                 for l in range(L)]).float()
    return out


def _float64(ctx: ProbeContext) -> dict[str, np.ndarray]:
    """The same in float64 numpy, from the captured tensors."""
    a = {k: v.double().numpy() for k, v in ctx.acts.items()}
    r0 = {k: v.double().numpy() for k, v in ctx.ref0.items()}
    pv = {k: v.double().numpy() for k, v in ctx.prev.items()}
    rms = lambda x: np.sqrt(np.mean(x**2))  # noqa: E731
    L = ctx.depth
    out = {"act_rms": np.array([[rms(a[(l, s)]) for s in SITES] for l in range(L)]),
           "delta0_rms": np.array([[rms(a[(l, s)] - r0[(l, s)]) for s in SITES] for l in range(L)]),
           "delta_prev_rms": np.array([[rms(a[(l, s)] - pv[(l, s)]) for s in SITES] for l in range(L)])}
    fd = a[(-1, FINAL_SITE)] - r0[(-1, FINAL_SITE)]
    out["final_update_share"] = np.array([np.sum((a[(l, "attn_add")] - r0[(l, "attn_add")] + a[(l, "mlp_add")]
                                                  - r0[(l, "mlp_add")]) * fd) / np.sum(fd**2) for l in range(L)])
    out["embed_update_share"] = np.sum((a[(-1, EMBED_SITE)] - r0[(-1, EMBED_SITE)]) * fd) / np.sum(fd**2)
    out["stream_cosine"] = np.array([np.mean(np.sum(a[(l, "resid_pre")] * a[(l, "resid_post")], -1)
                                             / np.linalg.norm(a[(l, "resid_pre")], axis=-1)
                                             / np.linalg.norm(a[(l, "resid_post")], axis=-1)) for l in range(L)])
    out["grad_rms"] = np.array([rms(g.double().numpy()) for g in ctx.grads])
    return out


def test_tables_are_bitwise_the_per_item_statistics(ctx):
    values = builtin_statistics(ctx)
    for name, want in _per_item(ctx).items():
        assert values[name].shape == want.shape, name
        assert torch.equal(values[name], want), (name, (values[name] - want).abs().max())


def test_stream_statistics_agree_with_float64(ctx):
    values = builtin_statistics(ctx)
    for name, want in _float64(ctx).items():
        np.testing.assert_allclose(values[name].double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)

"""The built-in statistics computed over stacked tables equal their per-site (per-result) formulas.

`builtin_statistics` reduces every (layer, site) of one probe step in one op per table (for speed at
small shapes). Here the same statistics are recomputed one site at a time, as the probes did before,
from a real model's captured stream at three parameter states: with one thread they are the same bits
(a row reduction of the table runs the reduction of that site alone); with any thread count they
agree to float32 round-off of sums over ≤ 10⁴ entries (rtol 1e-6), and all of them to a float64
recomputation to 1e-5.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.adapters import GPTAdapter
from probes.hooks import capture
from probes.linearization import branch_linearization
from probes.schema import BRANCHES, EMBED_SITE, FINAL_SITE, SITES
from probes.statistics import ProbeContext, builtin_statistics
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

DEPTH = 3


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _per_site(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """The stream statistics one site at a time (the probes' formulas before the tables)."""
    L, acts, ref0 = ctx.depth, ctx.acts, ctx.ref0
    grid = lambda f: torch.stack([torch.stack([f(l, s) for s in SITES]) for l in range(L)])  # noqa: E731
    out = {"act_rms": grid(lambda l, s: _rms(acts[(l, s)])),
           "delta0_rms": grid(lambda l, s: _rms(acts[(l, s)] - ref0[(l, s)])),
           "delta_prev_rms": grid(lambda l, s: _rms(acts[(l, s)] - ctx.prev[(l, s)]))}
    out["branch_to_stream"] = torch.stack([torch.stack([
        _rms(acts[(l, f"{b}_add")]) / _rms(acts[(l, ctx.branch_inputs[b])]) for b in BRANCHES]) for l in range(L)])
    out["stream_cosine"] = torch.stack([F.cosine_similarity(acts[(l, "resid_pre")], acts[(l, "resid_post")],
                                                            dim=-1).mean() for l in range(L)])
    final_delta = (acts[(-1, FINAL_SITE)] - ref0[(-1, FINAL_SITE)]).float()
    denom = final_delta.pow(2).sum()
    out["final_update_share"] = torch.stack([
        (sum((acts[(l, s)] - ref0[(l, s)]).float() for s in ("attn_add", "mlp_add")) * final_delta).sum() / denom
        for l in range(L)])
    out["grad_rms"] = torch.stack([_rms(g) for g in ctx.grads])
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


def test_tables_are_bitwise_the_per_site_statistics_with_one_thread(ctx):
    with _threads(1):
        values, expected = builtin_statistics(ctx), _per_site(ctx)
    for name, want in expected.items():
        assert values[name].shape == want.shape, name
        assert torch.equal(values[name], want), (name, (values[name] - want).abs().max())


def test_tables_agree_with_per_site_and_float64_statistics(ctx):
    values, expected = builtin_statistics(ctx), _per_site(ctx)
    for name, want in expected.items():
        torch.testing.assert_close(values[name], want, rtol=1e-6, atol=1e-7, msg=name)
    for name, want in _float64(ctx).items():
        np.testing.assert_allclose(values[name].double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)

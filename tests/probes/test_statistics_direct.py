"""Recorded stream statistics against a direct recomputation from the model with plain torch.

A tiny real run is probed; an observer keeps θ_t at two probe steps. Each statistic below is then
recomputed from those parameters by a hand-written residual stream (the model's own branch modules,
embedding and logits, but the residual additions, differences, projections and gradients written out
here in float64), independent of the probes' hooks, `ProbeContext` and reductions:
- final_update_share / embed_update_share: projection of each layer's (embedding's) change since
  step 0 onto the final stream's change, over ‖Δ final‖²; they also sum to 1 exactly, since the final
  stream is the embedding plus every branch's addition;
- stream_cosine: mean over tokens of cos(resid_pre, resid_post);
- branch_to_stream: RMS(attn_add)/RMS(resid_pre) and RMS(mlp_add)/RMS(resid_mid);
- grad_rms: RMS of dLoss/d resid_pre, by autograd on the hand-written stream.
A run with weight decay > 0 checks that the recorded Δθ is θ_{t+1} − θ_t with the decay in it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from probes.recorder import ProbeConfig, ProbeRecorder
from tests.probes.test_recorder import Snapshot
from trainer.loop import RunSpec, TrainConfig, Trainer
from trainer.model import ModelConfig
from trainer.parameterization import Parameterization

PROBE_STEPS = (0, 4)


def _spec(steps: int, wd_base: float = 0.0, depth: int = 3) -> RunSpec:
    param = Parameterization(name="alpha", alpha=1.0, width=64, depth=depth, base_width=64, lr_base=2**-7,
                             wd_base=wd_base)
    train = TrainConfig(steps=steps, batch_size=4, warmup_frac=0.0, schedule="constant", eval_every=steps,
                        eval_batches=1, eval_batch_size=4, checkpoint_every=steps, log_every=steps)
    return RunSpec(param=param, model=ModelConfig(seq_len=32), train=train)


def _hand_stream(model, params: dict, batch: torch.Tensor) -> dict:
    """The residual stream at θ = `params`, written out in float64: embed, per-layer sites, final, grads."""
    model = copy.deepcopy(model).double()
    model.load_state_dict({k: v.double() for k, v in params.items()})
    idx, targets = batch[:, :-1], batch[:, 1:]
    pos = torch.arange(idx.shape[1])
    x = model.wte(idx) + model.wpe(pos)
    out = {"embed": x.detach(), "layers": []}
    pre = []
    for block in model.blocks:
        s = block.branch_multiplier
        resid_pre = x
        attn_add = s * block.attn_branch(resid_pre)
        resid_mid = resid_pre + attn_add
        mlp_add = s * block.mlp_branch(resid_mid)
        x = resid_mid + mlp_add
        pre.append(resid_pre)
        out["layers"].append({k: v.detach() for k, v in dict(resid_pre=resid_pre, attn_add=attn_add,
                                                              resid_mid=resid_mid, mlp_add=mlp_add,
                                                              resid_post=x).items()})
    out["final"] = x.detach()
    loss = F.cross_entropy(model.logits(x).flatten(0, 1), targets.flatten())
    out["grads"] = [g.detach() for g in torch.autograd.grad(loss, pre)]
    return out


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("direct")
    spec = _spec(steps=6)
    config = ProbeConfig(every=4, batch_size=2, lin_batch_size=1)
    snap = Snapshot(PROBE_STEPS)
    trainer = Trainer(spec, run, observers=[ProbeRecorder(config, run, spec), snap], quiet=True)
    trainer.run()
    ds = xr.open_zarr(run / "probes.zarr").load()
    batch = trainer.data.probe_batch(config.batch_size)
    streams = {t: _hand_stream(trainer.model, snap.params[t], batch) for t in PROBE_STEPS}
    return ds, streams


def test_update_shares_equal_the_projection_onto_the_final_change(probed_run):
    ds, streams = probed_run
    h0, h4 = streams[0], streams[4]
    d_final = h4["final"] - h0["final"]
    denom = d_final.pow(2).sum()
    shares = []
    for l0, l4 in zip(h0["layers"], h4["layers"]):
        d_layer = (l4["attn_add"] - l0["attn_add"]) + (l4["mlp_add"] - l0["mlp_add"])
        shares.append(((d_layer * d_final).sum() / denom).item())
    embed_share = (((h4["embed"] - h0["embed"]) * d_final).sum() / denom).item()
    np.testing.assert_allclose(ds.final_update_share.sel(step=4).values, shares, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(ds.embed_update_share.sel(step=4).item(), embed_share, rtol=2e-3, atol=1e-5)
    # The final stream is the embedding plus every addition, so the shares sum to one (a definition
    # check that holds for the hand values exactly and for the recorded ones to float32 round-off).
    assert sum(shares) + embed_share == pytest.approx(1.0, abs=1e-9)
    assert float(ds.final_update_share.sel(step=4).sum() + ds.embed_update_share.sel(step=4)) == \
        pytest.approx(1.0, abs=1e-3)
    assert np.isnan(ds.final_update_share.sel(step=0)).all()  # no change yet: 0/0


@pytest.mark.parametrize("step", PROBE_STEPS)
def test_stream_cosine_branch_to_stream_and_grad_rms(probed_run, step):
    ds, streams = probed_run
    h = streams[step]
    cos = [F.cosine_similarity(lay["resid_pre"], lay["resid_post"], dim=-1).mean().item() for lay in h["layers"]]
    ratio = [[_rms(lay["attn_add"]) / _rms(lay["resid_pre"]), _rms(lay["mlp_add"]) / _rms(lay["resid_mid"])]
             for lay in h["layers"]]
    grads = [_rms(g) for g in h["grads"]]
    np.testing.assert_allclose(ds.stream_cosine.sel(step=step).values, cos, rtol=1e-5)
    np.testing.assert_allclose(ds.branch_to_stream.sel(step=step).transpose("layer", "branch").values, ratio,
                               rtol=1e-4)
    np.testing.assert_allclose(ds.grad_rms.sel(step=step).values, grads, rtol=1e-4)
    # Not vacuous: the layers differ from one another, and the step changes them.
    assert np.ptp(grads) > 1e-3 * max(grads) and np.ptp(np.asarray(ratio)) > 1e-3


def test_recorded_update_includes_weight_decay(tmp_path):
    """Δθ is θ_{t+1} − θ_t, decay included: AdamW shrinks W by lr·λ·W before its Adam step. With a
    large λ the Adam-only part differs from Δθ by percents, far above float32 round-off."""
    torch.set_num_threads(1)
    spec = _spec(steps=3, wd_base=10.0, depth=2)
    snap = Snapshot([1])
    trainer = Trainer(spec, tmp_path, observers=[ProbeRecorder(ProbeConfig(every=1, batch_size=2, lin_batch_size=1),
                                                               tmp_path, spec), snap], quiet=True)
    trainer.run()
    ds = xr.open_zarr(tmp_path / "probes.zarr").load()
    before, after = snap.params[1], snap.params[(1, "after")]
    groups = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(trainer.model.named_parameters())
    roles = trainer.model.parameter_roles()

    def update_rms(names, with_decay: bool) -> float:
        d2, n = 0.0, 0
        for name in names:
            g = groups[id(params[name])]
            assert g["weight_decay"] > 0
            delta = after[name].double() - before[name].double()
            if not with_decay:  # the Adam step alone: add back the decay lr·λ·θ_t
                delta = delta + g["lr"] * g["weight_decay"] * before[name].double()
            d2 += delta.pow(2).sum().item()
            n += delta.numel()
        return (d2 / n) ** 0.5

    hidden = [n for n, r in roles.items() if r.value == "hidden_weight" and n.startswith("blocks.0.")]
    embedding = [n for n, r in roles.items() if r.value == "embedding"]
    for names, recorded in ((hidden, ds.update_rms.sel(step=1, layer=0, block_role="hidden_weight").item()),
                            (embedding, ds.global_update_rms.sel(step=1, global_role="embedding").item())):
        with_decay, adam_only = update_rms(names, True), update_rms(names, False)
        assert recorded == pytest.approx(with_decay, rel=1e-5)
        assert abs(adam_only / with_decay - 1) > 0.01  # the check can tell the two apart

"""The recorder during real training: bitwise-neutral, hook-clean, and equal to direct recomputation."""

import json

import numpy as np
import pytest
import torch
import xarray as xr

from probes.adapters import GPTAdapter
from probes.hooks import capture, count_hooks
from probes.recorder import ProbeConfig, ProbeRecorder, probe_steps
from probes.session import ProbeSession
from probes.statistics import USER_STATISTICS, register_statistic
from tests.probes.conftest import tiny_spec
from trainer.loop import Trainer
from trainer.observers import Observer


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_probe_schedule():
    assert probe_steps(100, 25) == [0, 1, 2, 4, 8, 16, 25, 50, 75, 99]
    assert probe_steps(5, 10, early=False) == [0, 4]


def test_training_is_bitwise_identical_with_probes_on_and_off(tmp_path):
    spec = tiny_spec(steps=8)
    off = Trainer(spec, tmp_path / "off", quiet=True)
    off.run()
    rec = ProbeRecorder(ProbeConfig(every=2, flush_every=3), tmp_path / "on", spec)
    on = Trainer(spec, tmp_path / "on", observers=[rec], quiet=True)
    on.run()
    assert _losses(tmp_path / "off") == _losses(tmp_path / "on")
    for (n, a), (_, b) in zip(off.model.state_dict().items(), on.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert count_hooks(on.model) == 0
    ds = xr.open_zarr(tmp_path / "on" / "probes.zarr")
    assert list(ds.step.values) == probe_steps(8, 2)


def test_no_hook_left_when_a_probe_raises(tmp_path):
    spec = tiny_spec()
    trainer = Trainer(spec, tmp_path, quiet=True)
    adapter = GPTAdapter(trainer.model)
    too_long = torch.zeros(2, 64, dtype=torch.long)  # longer than seq_len: the model raises mid-forward
    session = ProbeSession(adapter, too_long)
    with pytest.raises(ValueError):
        session.before_update(0)
    assert count_hooks(trainer.model) == 0
    with pytest.raises(RuntimeError), capture(adapter.sites()):
        raise RuntimeError("inside the with block")
    assert count_hooks(trainer.model) == 0


class Snapshot(Observer):
    """Keeps θ_t at the steps it is asked for (runs after the recorder, sees the same θ_t)."""

    name = "snapshot"

    def __init__(self, steps):
        self.steps, self.params = set(steps), {}

    def wants(self, step):
        return step in self.steps

    def before_update(self, step, trainer):
        self.params[step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def after_update(self, step, trainer):
        self.params[(step, "after")] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_recorded_values_equal_direct_recomputation(tmp_path):
    spec = tiny_spec(steps=10, depth=3)
    rec = ProbeRecorder(ProbeConfig(every=4), tmp_path, spec)
    snap = Snapshot([0, 8])
    trainer = Trainer(spec, tmp_path, observers=[rec, snap], quiet=True)
    trainer.run()
    ds = xr.open_zarr(tmp_path / "probes.zarr").load()
    batch = trainer.data.probe_batch(ProbeConfig().batch_size)
    model = trainer.model

    def streams(params):
        model.load_state_dict(params)
        out = {}
        hooks = [b.hooks["resid_post"].register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o))
                 for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            model(batch[:, :-1])
        for h in hooks:
            h.remove()
        return out

    h0, h8 = streams(snap.params[0]), streams(snap.params[8])
    layer = 1
    rms = h8[layer].pow(2).mean().sqrt().item()
    delta0 = (h8[layer] - h0[layer]).pow(2).mean().sqrt().item()
    rec_rms = ds.act_rms.sel(step=8, layer=layer, site="resid_post").item()
    rec_delta0 = ds.delta0_rms.sel(step=8, layer=layer, site="resid_post").item()
    np.testing.assert_allclose(rec_rms, rms, rtol=1e-5)
    np.testing.assert_allclose(rec_delta0, delta0, rtol=1e-4)
    # ||ΔW|| / ||W|| over the hidden weights of the layer, from θ_8 and θ_9 directly.
    before, after = snap.params[8], snap.params[(8, "after")]
    names = [n for n, r in model.parameter_roles().items()
             if r.value == "hidden_weight" and n.startswith(f"blocks.{layer}.")]
    d2 = sum((after[n] - before[n]).pow(2).sum() for n in names)
    w2 = sum(before[n].pow(2).sum() for n in names)
    rec_rel = ds.update_rel.sel(step=8, layer=layer, block_role="hidden_weight").item()
    np.testing.assert_allclose(rec_rel, (d2 / w2).sqrt().item(), rtol=1e-5)
    assert ds.attrs["depth"] == 3 and ds.attrs["param"] == "alpha"


def test_user_statistic_is_one_registered_function(tmp_path):
    @register_statistic("attn_add_abs_max", dims=("layer",), description="max |attn_add| per layer")
    def attn_add_abs_max(ctx):
        return torch.stack([ctx.acts[(l, "attn_add")].abs().max() for l in range(ctx.depth)])

    try:
        spec = tiny_spec(steps=4)
        trainer = Trainer(spec, tmp_path, observers=[ProbeRecorder(ProbeConfig(every=2), tmp_path, spec)],
                          quiet=True)
        trainer.run()
        ds = xr.open_zarr(tmp_path / "probes.zarr")
        assert ds.attn_add_abs_max.dims == ("step", "layer")
        assert np.all(ds.attn_add_abs_max.values > 0)
    finally:
        USER_STATISTICS.pop("attn_add_abs_max")

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


def test_linearization_uses_the_first_lin_batch_size_sequences(tmp_path):
    """Recorded lin ratios equal a direct branch_linearization on the first 2 of 4 probe sequences."""
    from probes.linearization import branch_linearization

    spec = tiny_spec(steps=6, depth=2)
    config = ProbeConfig(every=4, batch_size=4, lin_batch_size=2)
    snap = Snapshot([4])
    trainer = Trainer(spec, tmp_path, observers=[ProbeRecorder(config, tmp_path, spec), snap], quiet=True)
    trainer.run()
    ds = xr.open_zarr(tmp_path / "probes.zarr").load()
    model = trainer.model
    batch = trainer.data.probe_batch(config.batch_size)
    model.load_state_dict(snap.params[4])
    adapter = GPTAdapter(model)
    with torch.no_grad(), capture(adapter.sites()) as acts:
        adapter.loss(batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict(snap.params[(4, "after")])
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with adapter.linearizable():
        for layer in range(2):
            for name in ("attn", "mlp"):
                branch, site = adapter.branch(layer, name)
                local = {k: k2 for k, p in branch.named_parameters() for k2, q in model.named_parameters() if p is q}
                ratio = {}
                for n in (2, 4):
                    res = branch_linearization(branch, acts[(layer, site)][:n].float(),
                                               {k: before[g] for k, g in local.items()},
                                               {k: after[g] for k, g in local.items()})
                    ratio[n] = res.lin_ratio.item()
                recorded = ds.lin_ratio.sel(step=4, layer=layer, branch=name).item()
                np.testing.assert_allclose(recorded, ratio[2], rtol=1e-5)
                assert abs(recorded / ratio[4] - 1) > 1e-5  # the subset is what was measured, not the batch


class StoreWatcher(Observer):
    """After the recorder's after_update: which steps can a reader already see in the store?"""

    name = "watcher"

    def __init__(self, path):
        self.path, self.seen = path, {}

    def wants(self, step):
        return True

    def before_update(self, step, trainer):
        pass

    def after_update(self, step, trainer):
        self.seen[step] = list(xr.open_zarr(self.path).step.values) if self.path.exists() else []


@pytest.mark.parametrize("flush_seconds", [1e-9, 3600.0])
def test_store_is_appended_once_flush_seconds_have_passed(tmp_path, flush_seconds):
    spec = tiny_spec(steps=6)  # checkpoints (each flushes the buffer) after steps 3 and 5
    rec = ProbeRecorder(ProbeConfig(every=2, early=False, flush_every=1000, flush_seconds=flush_seconds),
                        tmp_path, spec)
    watcher = StoreWatcher(tmp_path / "probes.zarr")
    Trainer(spec, tmp_path, observers=[rec, watcher], quiet=True).run()
    if flush_seconds < 1:
        assert watcher.seen[2] == [0, 2]  # every probe step is readable as soon as it is measured
        assert watcher.seen[4] == [0, 2, 4]
    else:
        assert watcher.seen[2] == []  # buffered: neither the count nor the time limit was reached
        assert watcher.seen[4] == [0, 2]  # the checkpoint after step 3 flushed
    assert list(xr.open_zarr(tmp_path / "probes.zarr").step.values) == [0, 2, 4, 5]

"""ProbeLog in a plain PyTorch loop (no Trainer): neutral to training, and readable by the analyses."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

from analyses.load import open_run
from probes.adapters import GPTAdapter
from probes.hooks import count_hooks
from probes.probe_log import ProbeLog
from trainer.data import DataConfig, TokenData
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

STEPS, PROBED = 6, [0, 2, 5]


def train(run_dir=None):
    """Six AdamW steps of a tiny GPT; with a ProbeLog around each update when run_dir is given."""
    torch.manual_seed(0)
    param = Parameterization(name="sp", width=64, depth=2, base_width=64)
    model = GPT(param, ModelConfig(seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = TokenData(DataConfig(), seq_len=32)
    log = None
    if run_dir is not None:
        log = ProbeLog(GPTAdapter(model), data.probe_batch(4), run_dir, steps=PROBED,
                       attrs={"param": "sp", "width": 64, "lr": 3e-3, "label": "plain loop"}, flush_every=2)
    losses = []
    for step in range(STEPS):
        batch = data.train_batch(seed=0, step=step, batch_size=4)
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        losses.append(loss.item())
        with log.update(step, optimizer, train_loss=loss, val_loss=float(step)) if log else torch.no_grad():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if log:
        log.close()
    return model, losses


def test_plain_loop_records_every_probe_step_without_changing_training(tmp_path):
    plain_model, plain_losses = train()
    model, losses = train(tmp_path)
    assert losses == plain_losses
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert count_hooks(model) == 0

    ds = xr.open_zarr(tmp_path / "probes.zarr").load()
    assert list(ds.step.values) == PROBED
    np.testing.assert_allclose(ds.train_loss.values, [losses[s] for s in PROBED], rtol=1e-6)
    np.testing.assert_array_equal(ds.val_loss.values, [float(s) for s in PROBED])
    assert list(ds.group.values) == ["0"] and np.allclose(ds.effective_lr.values, 3e-3)
    assert ds.attrs["param"] == "sp" and ds.attrs["depth"] == 2 and math.isnan(ds.attrs["alpha"])
    assert ds.attrs["probe_dtype"] == "float64"
    assert np.all(np.isfinite(ds.lin_ratio.sel(step=[2, 5]).values))
    run = open_run(tmp_path)  # the analyses read it like a run dir of the toolkit's own
    assert run.sizes["layer"] == 2


def test_an_existing_store_is_refused_unless_appending(tmp_path):
    train(tmp_path)
    model = GPT(Parameterization(name="sp", width=64, depth=2, base_width=64), ModelConfig(seq_len=32))
    batch = TokenData(DataConfig(), seq_len=32).probe_batch(2)
    with pytest.raises(FileExistsError, match="already holds probe records"):
        ProbeLog(GPTAdapter(model), batch, tmp_path)
    ProbeLog(GPTAdapter(model), batch, tmp_path, append=True)


def test_an_undeclared_scalar_fails_at_once(tmp_path):
    model = GPT(Parameterization(name="sp", width=64, depth=2, base_width=64), ModelConfig(seq_len=32))
    log = ProbeLog(GPTAdapter(model), TokenData(DataConfig(), seq_len=32).probe_batch(2), tmp_path)
    with pytest.raises(KeyError, match="train_los"):
        log.after_update(0, train_los=1.0)
    assert not (tmp_path / "probes.zarr").exists()

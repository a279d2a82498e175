"""ProbeLog in a plain PyTorch loop (no Trainer): neutral to training, and readable by the analyses."""

import math
import re

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


def train(run_dir=None, attrs=None, pass_optimizer=True):
    """Six AdamW steps of a tiny GPT; with a ProbeLog around each update when run_dir is given."""
    torch.manual_seed(0)
    param = Parameterization(name="sp", width=64, depth=2, base_width=64)
    model = GPT(param, ModelConfig(seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = TokenData(DataConfig(), seq_len=32)
    log = None
    if run_dir is not None:
        attrs = {"param": "sp", "width": 64, "lr": 3e-3, "label": "plain loop"} if attrs is None else attrs
        log = ProbeLog(GPTAdapter(model), data.probe_batch(4), run_dir, steps=PROBED, attrs=attrs, flush_every=2)
    losses = []
    for step in range(STEPS):
        batch = data.train_batch(seed=0, step=step, batch_size=4)
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        losses.append(loss.item())
        opt = optimizer if pass_optimizer else None
        with log.update(step, opt, train_loss=loss, val_loss=float(step)) if log else torch.no_grad():
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


@pytest.mark.parametrize(("attrs", "needle"), [({"param": "custom"}, "param='custom'"),
                                               ({"param": "alpha"}, "alpha=nan"),
                                               ({"param": "alpha", "alpha": 2.0}, "alpha=2.0")])
def test_identity_the_analyses_cannot_read_is_refused(tmp_path, attrs, needle):
    model = GPT(Parameterization(name="sp", width=64, depth=2, base_width=64), ModelConfig(seq_len=32))
    with pytest.raises(ValueError, match=re.escape(needle)):
        ProbeLog(GPTAdapter(model), TokenData(DataConfig(), seq_len=32).probe_batch(2), tmp_path, attrs=attrs)


def test_identity_defaults_come_from_the_model_and_optimizer(tmp_path):
    from analyses.load import run_identity

    train(tmp_path, attrs={})
    ident = run_identity(tmp_path)
    assert (ident["param"], ident["depth"], ident["width"], ident["lr"]) == ("sp", 2, 64, 3e-3)


def test_a_store_without_a_usable_lr_is_refused_by_the_analyses_in_one_line(tmp_path):
    import subprocess
    import sys

    train(tmp_path, attrs={}, pass_optimizer=False)  # nothing says what the learning rate was
    proc = subprocess.run([sys.executable, "-m", "diagnose", "report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path}: run attribute lr=nan must be a positive number"]


def test_to_host_is_each_value_as_float64():
    # One cat into a float64 buffer must give exactly `.double()` of each value, shape kept: float32,
    # float64, bfloat16, an int64 beyond float32's 2²⁴, bools, NaN/−0/inf, a value that requires grad.
    from probes.probe_log import to_host

    gen = torch.Generator().manual_seed(0)
    values = {"f32": torch.randn(3, 4, generator=gen), "f64": torch.randn(2, dtype=torch.float64, generator=gen),
              "int": torch.tensor(2**40 + 3), "bool": torch.tensor([True, False]),
              "bf16": torch.randn((), generator=gen).to(torch.bfloat16),
              "special": torch.tensor([math.nan, -0.0, math.inf]), "grad": torch.ones(2, requires_grad=True) * 3}
    row = to_host(values, torch.device("cpu"))
    assert list(row) == list(values)
    for name, value in values.items():
        want = value.detach().double().numpy()
        assert row[name].dtype == np.float64 and row[name].shape == want.shape, name
        assert np.array_equal(row[name], want, equal_nan=True), name
        assert np.array_equal(np.signbit(row[name]), np.signbit(want)), name

"""Live sinks: TensorBoard event files and W&B (offline) carry what the store records; off by default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analyses.load import open_run
from probes.adapters import GPTAdapter
from probes.probe_log import ProbeLog
from trainer.model import GPT, ModelConfig
from trainer.parameterization import Parameterization

REPO = Path(__file__).resolve().parents[2]


def run(run_dir: Path, live) -> None:
    torch.manual_seed(0)
    model = GPT(Parameterization(width=64, depth=2, base_width=64), ModelConfig(seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    log = ProbeLog(GPTAdapter(model), batch, run_dir, live=live)
    for step in range(3):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        with log.update(step, optimizer, train_loss=loss):
            optimizer.step()
        optimizer.zero_grad()
    log.close()


def test_tensorboard_scalars_equal_the_store(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    ds = open_run(tmp_path)
    for tag, stored in (("lin_ratio/mlp/layer_01", ds.lin_ratio.sel(layer=1, branch="mlp")),
                        ("feature_update/layer_00", ds.delta0_rms.sel(layer=0, site="resid_post")),
                        ("loss/train", ds.train_loss)):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 1, 2], tag
        assert [s.value for s in scalars] == pytest.approx(stored.values.tolist(), rel=1e-6), tag


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, ["wandb"])
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_sinks_are_off_by_default_and_a_bad_name_is_one_line(tmp_path):
    code = ("import sys, torch; from probes.probe_log import ProbeLog; import probes.session; "
            "bad = [m for m in ('probes.sinks', 'wandb', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules]; "
            "print(bad)")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
    with pytest.raises(ValueError, match="live='tensorbored' is not a sink; allowed: tensorboard, wandb"):
        run(tmp_path, "tensorbored")


def test_the_toolkits_own_runs_turn_sinks_on_with_one_option(tmp_path):
    pytest.importorskip("tensorboard")
    from probes.recorder import ProbeConfig, ProbeRecorder
    from tests.probes.conftest import tiny_spec
    from trainer.errors import ConfigError
    from trainer.loop import Trainer

    spec = tiny_spec(steps=4)
    recorder = ProbeRecorder(ProbeConfig(every=2, live="tensorboard"), tmp_path, spec)
    Trainer(spec, tmp_path, observers=[recorder], quiet=True).run()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="probe live='tb' is not a sink"):
        ProbeConfig(live="tensorboard,tb")

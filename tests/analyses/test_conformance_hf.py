"""`diagnose conform` on a sweep recorded through an adapter: a stock Hugging Face Llama (one AdamW LR,
init std 0.02 everywhere: standard parameterization) trained in a plain loop with `ProbeLog`, depths 2-8."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import zarr

from analyses.conformance import conformance
from analyses.load import open_sweep
from probes.adapters import adapter_for
from probes.probe_log import ProbeLog
from trainer.data import DataConfig, TokenData

transformers = pytest.importorskip("transformers", reason="needs the optional 'hf' extra")

LR, STEPS = 3e-3, 16


def _train(run_dir, depth: int, seed: int) -> None:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=depth,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    data = TokenData(DataConfig(), seq_len=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    log = ProbeLog(adapter_for(model), data.probe_batch(2), run_dir, attrs={"param": "sp", "lr": LR, "seed": seed})
    for step in range(STEPS):
        batch = data.train_batch(seed=seed, step=step, batch_size=4)
        model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss.backward()
        with log.update(step, optimizer):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    log.close()


@pytest.fixture(scope="module")
def llama_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_sp")
    torch.set_num_threads(1)
    for depth in (2, 4, 8):
        for seed in (0, 1):
            _train(root / f"d{depth}_s{seed}", depth, seed)
    return root


def _status(table, quantity, component="-"):
    rows = table[(table["quantity"] == quantity) & (table["component"] == component) & (table["axis"] == "depth")]
    assert len(rows) == 1, (quantity, component)
    return rows["status"].iloc[0]


def test_stock_llama_sweep_conforms_to_sp(llama_sweep):
    table = conformance(open_sweep(llama_sweep), n_boot=200)
    assert (table["status"] != "fail").all(), table[table["status"] == "fail"].to_string()
    # The rows that need the adapter's roles, internal sites and stream sites are there and pass.
    for quantity, component in (("update_rms", "hidden_weight"), ("feature_change", "mlp"),
                                ("branch_add_init", "mlp_add"), ("stream_change", "-")):
        assert _status(table, quantity, component) == "pass", quantity


def test_stock_llama_claimed_as_completep_fails_on_the_branch_multiplier(llama_sweep, tmp_path):
    # The same records labelled α = 1: a Llama without branch multipliers cannot be CompleteP.
    claimed = tmp_path / "claimed"
    shutil.copytree(llama_sweep, claimed)
    for run in claimed.iterdir():
        zarr.open_group(run / "probes.zarr", mode="r+").attrs.update({"param": "alpha", "alpha": 1.0})
    table = conformance(open_sweep(claimed), n_boot=200)
    assert _status(table, "branch_add_init", "mlp_add") == "fail"
    assert _status(table, "stream_change") == "fail"
    proc = subprocess.run([sys.executable, "-m", "diagnose", "conform", str(claimed), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and '"status": "fail"' in proc.stdout

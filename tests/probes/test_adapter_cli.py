"""`diagnose roles` and `diagnose audit-model` on a Hugging Face model saved to a local dir (no download).

Two runs of the real CLI in subprocesses; the bad-input lines through click's runner (same code, no
process start-up each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the model commands need the optional 'hf' extra")

from click.testing import CliRunner  # noqa: E402

from diagnose.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def diagnose(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "diagnose", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny tied-embedding Llama (safetensors), its optimizer state (named groups) and one without names."""
    root = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "llama")
    torch.save(torch.optim.AdamW(model.named_parameters(), lr=1e-3, eps=1e-8).state_dict(), root / "named.pt")
    torch.save(torch.optim.AdamW(model.parameters(), lr=1e-3).state_dict(), root / "unnamed.pt")
    torch.save(torch.optim.AdamW(model.model.layers.named_parameters(prefix="model.layers")).state_dict(),
               root / "partial.pt")
    return root / "llama", root / "named.pt", root / "unnamed.pt"


def test_roles_and_audit_model_in_subprocesses(saved, tmp_path):
    model_dir, named, _ = saved
    roles = diagnose(["roles", str(model_dir), "--json"], tmp_path)
    assert roles.returncode == 0, roles.stderr
    found = json.loads(roles.stdout)
    assert found["model.embed_tokens.weight"] == "embedding" and "lm_head.weight" not in found  # tied: once
    assert found["model.layers.2.self_attn.k_proj.weight"] == "hidden_weight"  # GQA projection
    assert found["model.layers.0.input_layernorm.weight"] == "block_norm" and found["model.norm.weight"] == "final_norm"
    assert set(found.values()) == {"embedding", "block_norm", "hidden_weight", "final_norm"}

    audit = diagnose(["audit-model", str(model_dir), "--optimizer", str(named), "--base-width", "32"], tmp_path)
    assert audit.returncode == 1, audit.stderr
    assert "MISMATCH hidden_weight: lr 0.001, Table 1 says 0.0005" in audit.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in audit.stdout


def one_line_failure(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def test_bad_input_is_one_line(saved, tmp_path):
    model_dir, _, unnamed = saved
    assert "no config.json" in one_line_failure(["roles", str(tmp_path)])
    transformers.OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                           num_attention_heads=4).save_pretrained(tmp_path / "opt")
    line = one_line_failure(["roles", str(tmp_path / "opt")])
    assert "no probe adapter for OPTForCausalLM" in line and "DecoderSpec" in line
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64).save_pretrained(tmp_path / "vit")
    assert "not a causal language model" in one_line_failure(["roles", str(tmp_path / "vit")])
    assert "no param_names" in one_line_failure(["audit-model", str(model_dir), "--optimizer", str(unnamed)])
    line = one_line_failure(["audit-model", str(model_dir), "--optimizer", str(unnamed.parent / "partial.pt")])
    assert "optimizer groups do not cover the model exactly once: missing ['model.embed_tokens.weight'" in line

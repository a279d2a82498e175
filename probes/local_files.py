"""A saved Hugging Face model and optimizer, read safely from local files (for `diagnose roles` / `audit-model`).

Nothing is downloaded (`local_files_only`), no remote code runs, weights are read from safetensors only,
and an optimizer state is read with `torch.load(weights_only=True)`: no file here is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_model(path: str | Path, weights: bool = True) -> nn.Module:
    """The causal LM saved in directory `path` (config.json, and model.safetensors when `weights`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here (expected a model dir written by save_pretrained)")
    if weights and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors are read; .bin files are pickles)")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a one-line tool: no loading bar on stderr
    try:
        if not weights:
            return AutoModelForCausalLM.from_config(config)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                    use_safetensors=True)
    except ValueError as err:  # transformers: "Unrecognized configuration class ..."
        raise ValueError(f"{path}: model_type {config.model_type!r} is not a causal language model "
                         f"({str(err).splitlines()[0][:120]})") from None
    finally:
        if bar:
            logging.enable_progress_bar()


def load_optimizer_groups(path: str | Path, model: nn.Module) -> list[dict]:
    """The param groups of an optimizer `state_dict()` saved with torch.save, with the model's tensors in them.

    The groups must name their parameters ("param_names": build the optimizer from
    `model.named_parameters()`), since a state dict's integer indices do not say which tensor is which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such optimizer file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "param_groups" not in state:
        raise ValueError(f"{path}: not an optimizer state_dict (no 'param_groups')")
    named = dict(model.named_parameters(remove_duplicate=False))
    groups = []
    for i, g in enumerate(state["param_groups"]):
        if "param_names" not in g:
            raise ValueError(f"{path}: group {i} has no param_names; build the optimizer from "
                             "model.named_parameters() so that its state names its tensors")
        unknown = [n for n in g["param_names"] if n not in named]
        if unknown:
            raise ValueError(f"{path}: group {i} names parameters the model does not have: {unknown[:5]}")
        groups.append({**g, "params": [named[n] for n in g["param_names"]]})
    return groups

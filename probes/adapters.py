"""Adapters: how the probes find sites, branches and parameters in a model, by name.

The probes never touch a model directly; they ask an adapter for
- `sites()`: (layer, site) → where the tensor is (layer −1 holds the model-level sites
  `embed` and `final_stream`);
- `branch(layer, name)`: a module F with F(h) = the raw branch output, callable as a pure function of
  its own parameters, and the site that is its input h;
- `loss(batch)`: the next-token loss of a (b, t+1) token batch;
- `parameter_roles()` and `layer_of(name)`: for the per-role update statistics;
- `internal_sites(layer)`: where a block's internal features are read ("mlp_hidden", "attn_mix").
Hugging Face decoders (GPT-2, Llama, Mistral, Qwen, GPT-NeoX) need no code: `adapter_for(model)` finds
their `DecoderSpec` (probes.families); another pre-norm decoder takes a spec of about ten lines
(probes.decoder). Only a model that is not a pre-norm decoder needs a `ModelAdapter` subclass.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from probes.hooks import SiteSpec
from probes.schema import EMBED_SITE, FINAL_SITE, SITES

if TYPE_CHECKING:
    from probes.decoder import DecoderSpec


class ModelAdapter:
    """The interface; subclasses describe one architecture."""

    model: nn.Module
    depth: int

    def sites(self) -> dict[tuple[int, str], SiteSpec]:
        raise NotImplementedError

    def branch(self, layer: int, name: str) -> tuple[nn.Module, str]:
        """(module computing the raw branch output from its input, name of the input site)."""
        raise NotImplementedError

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def internal_sites(self, layer: int) -> dict[str, SiteSpec]:
        """Where block `layer`'s internal features are read, inside its branch modules (CONTRACT.md):
        "mlp_hidden" (input of the MLP's output projection: the activation after the non-linearity),
        "attn_mix" (input of the attention's output projection: heads' weighted values), and, where
        the model exposes them on its linearizable path, "attn_logits" and "attn_probs"."""
        raise NotImplementedError(f"{type(self).__name__} does not expose internal sites")

    def parameter_roles(self) -> dict[str, str]:
        """Parameter name → role (see probes.schema.ROLES)."""
        raise NotImplementedError

    def layer_of(self, name: str) -> int | None:
        match = re.search(self.block_pattern, name)
        return int(match.group(1)) if match else None

    block_pattern = r"blocks\.(\d+)\."

    def linearizable(self) -> contextlib.AbstractContextManager:
        """A context in which forward-mode AD works through the branches (no fused attention)."""
        return contextlib.nullcontext()

    def probing(self) -> contextlib.AbstractContextManager:
        """A context for the probe forward, in which an adapter may record what its branches need."""
        return contextlib.nullcontext()


class GPTAdapter(ModelAdapter):
    """Our GPT (trainer.model.GPT): hook points and branch modules are named in the model."""

    def __init__(self, model: nn.Module):
        self.model, self.depth = model, len(model.blocks)

    def sites(self) -> dict[tuple[int, str], SiteSpec]:
        out = {(-1, EMBED_SITE): SiteSpec(self.model.embed_hook), (-1, FINAL_SITE): SiteSpec(self.model.final_hook)}
        for layer, block in enumerate(self.model.blocks):
            out.update({(layer, site): SiteSpec(block.hooks[site]) for site in SITES})
        return out

    def branch(self, layer: int, name: str) -> tuple[nn.Module, str]:
        block = self.model.blocks[layer]
        return (block.attn_branch, "resid_pre") if name == "attn" else (block.mlp_branch, "resid_mid")

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch[:, :-1], batch[:, 1:])

    def internal_sites(self, layer: int) -> dict[str, SiteSpec]:
        block = self.model.blocks[layer]
        attn = block.attn_branch.attn
        return {"mlp_hidden": SiteSpec(block.mlp_branch.proj, "input"), "attn_mix": SiteSpec(attn.proj, "input"),
                "attn_logits": SiteSpec(attn.logits_hook), "attn_probs": SiteSpec(attn.probs_hook)}

    def parameter_roles(self) -> dict[str, str]:
        return {name: role.value for name, role in self.model.parameter_roles().items()}

    def linearizable(self) -> contextlib.AbstractContextManager:
        return self.model.attention_backend("math")


def adapter_for(model: nn.Module, spec: DecoderSpec | None = None) -> ModelAdapter:
    """The adapter for `model`: our GPT, a known Hugging Face decoder family (probes.families), or any
    pre-norm decoder described by `spec`. An unknown model gets a LookupError saying what to write."""
    from probes.decoder import DecoderAdapter
    from probes.families import spec_for

    if spec is not None:
        return DecoderAdapter(model, spec)
    if hasattr(model, "blocks") and hasattr(model, "embed_hook"):
        return GPTAdapter(model)
    return DecoderAdapter(model, spec_for(model))


def __getattr__(name: str):
    # The Hugging Face adapters live in probes.decoder / probes.families; keep the old imports working.
    if name in ("HFGPT2Adapter", "DecoderAdapter", "DecoderSpec"):
        import probes.families

        return getattr(probes.families, name)
    raise AttributeError(f"module 'probes.adapters' has no attribute {name!r}")

"""Adapters: how the probes find sites, branches and parameters in a model, by name.

The probes never touch a model directly; they ask an adapter for
- `sites()`: (layer, site) → where the tensor is (layer −1 holds the model-level sites
  `embed` and `final_stream`);
- `branch(layer, name)`: a module F with F(h) = the raw branch output, callable as a pure function of
  its own parameters, and the site that is its input h;
- `loss(batch)`: the next-token loss of a (b, t+1) token batch;
- `parameter_roles()` and `layer_of(name)`: for the per-role update statistics.
To probe another architecture, subclass `ModelAdapter` and fill these in (see `HFGPT2Adapter`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from probes.hooks import SiteSpec
from probes.schema import EMBED_SITE, FINAL_SITE, SITES


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


class _Chain(nn.Module):
    """f(g(x)) for two existing modules, sharing their parameters (for branches made of parts)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x))
        return y[0] if isinstance(y, tuple) else y


class HFGPT2Adapter(ModelAdapter):
    """A Hugging Face `GPT2LMHeadModel` (e.g. built from a `GPT2Config`, no download needed).

    GPT-2 adds its branches with multiplier 1, so `*_add` equals `*_out`. The attention branch is
    `attn(ln_1(x))`; it is differentiated forward-mode with the eager attention implementation.
    """

    block_pattern = r"transformer\.h\.(\d+)\."

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = model.transformer.h
        self.depth = len(self.blocks)
        self._attn_branches = [_Chain(b.ln_1, b.attn) for b in self.blocks]
        self._mlp_branches = [_Chain(b.ln_2, b.mlp) for b in self.blocks]

    def sites(self) -> dict[tuple[int, str], SiteSpec]:
        t = self.model.transformer
        out = {(-1, EMBED_SITE): SiteSpec(self.blocks[0], "input"), (-1, FINAL_SITE): SiteSpec(t.ln_f, "input")}
        for layer, b in enumerate(self.blocks):
            out[(layer, "resid_pre")] = SiteSpec(b, "input")
            out[(layer, "attn_out")] = out[(layer, "attn_add")] = SiteSpec(b.attn, "output")
            out[(layer, "resid_mid")] = SiteSpec(b.ln_2, "input")
            out[(layer, "mlp_out")] = out[(layer, "mlp_add")] = SiteSpec(b.mlp, "output")
            out[(layer, "resid_post")] = SiteSpec(b, "output")
        return out

    def branch(self, layer: int, name: str) -> tuple[nn.Module, str]:
        if name == "attn":
            return self._attn_branches[layer], "resid_pre"
        return self._mlp_branches[layer], "resid_mid"

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.model(batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def parameter_roles(self) -> dict[str, str]:
        roles = {}
        for name, _ in self.model.named_parameters():
            if name.endswith("wte.weight"):
                roles[name] = "embedding"
            elif name.endswith("wpe.weight"):
                roles[name] = "position_embedding"
            elif name.startswith("transformer.ln_f"):
                roles[name] = "final_norm"
            elif name.startswith("lm_head"):
                roles[name] = "unembedding"
            elif ".ln_" in name:
                roles[name] = "block_norm"
            else:
                roles[name] = "hidden_bias" if name.endswith(".bias") else "hidden_weight"
        return roles

    @contextlib.contextmanager
    def linearizable(self) -> Iterator[None]:
        config = self.model.config
        previous = getattr(config, "_attn_implementation", None)
        config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = previous


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Pick the adapter for a known model class."""
    if hasattr(model, "blocks") and hasattr(model, "embed_hook"):
        return GPTAdapter(model)
    if type(model).__name__ == "GPT2LMHeadModel":
        return HFGPT2Adapter(model)
    raise TypeError(f"no probe adapter for {type(model).__name__}; subclass probes.adapters.ModelAdapter")

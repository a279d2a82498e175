"""One adapter for every pre-norm decoder, driven by a few names: `DecoderSpec` and `DecoderAdapter`.

Decoder families differ in what their parts are called (block list, attention and MLP modules, the
norms before them, final norm, embeddings) and in one structural flag (parallel residual: attention and
MLP both read the block input, as in GPT-NeoX). A `DecoderSpec` names those; `DecoderAdapter` does the
rest. A new family takes about ten lines (README, "Probes on a model you did not build"):

    spec = DecoderSpec(blocks="model.layers", attn="self_attn", attn_norm="input_layernorm",
                       mlp="mlp", mlp_norm="post_attention_layernorm",
                       final_norm="model.norm", embedding="model.embed_tokens")
    log = ProbeLog(adapter_for(model, spec=spec), probe_batch, "runs/mine")

**Branches by replay.** The branch handed to the linearization is F(h) = module(norm(h), *rest), where
`module` is the model's own attention (or MLP) and `rest` are the very positional and keyword arguments
it received in the probe forward (attention mask, rotary cos/sin, position ids; recorded by forward
pre-hooks with kwargs). Nothing of the model is re-implemented, so a causal mask or a rotary embedding
can not be forgotten: the branch reproduces the model's own branch output at that layer (tested per
family to ≤ 1e-6 relative in float64). The input h is the tensor the norm receives (`resid_pre`, or
`resid_mid` for a sequential MLP), so the norm's parameters are part of the branch, as in our GPT.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from probes.adapters import ModelAdapter
from probes.hooks import SiteSpec
from probes.probe_attention import PROBE_ATTENTION, attention_implementation
from probes.schema import EMBED_SITE, FINAL_SITE


@dataclass(frozen=True)
class DecoderSpec:
    """Where a decoder family keeps its parts: dotted module paths (model-level or block-level)."""

    blocks: str  # from the model: the list of blocks, e.g. "model.layers"
    attn: str  # in a block: the attention module, e.g. "self_attn"
    attn_norm: str  # in a block: the norm whose output the attention reads, e.g. "input_layernorm"
    mlp: str  # in a block: the MLP module, e.g. "mlp"
    mlp_norm: str  # in a block: the norm whose output the MLP reads, e.g. "post_attention_layernorm"
    final_norm: str  # from the model: the norm after the last block, e.g. "model.norm"
    embedding: str  # from the model: the token embedding, e.g. "model.embed_tokens"
    unembedding: str = "lm_head"  # from the model: the output projection (may share the embedding's weight)
    position_embedding: str | None = None  # from the model: learned positions, if any (GPT-2: "transformer.wpe")
    attn_out_proj: str = "o_proj"  # in the attention module: its output projection (internal site attn_mix)
    mlp_out_proj: str = "down_proj"  # in the MLP module: its output (down) projection (internal site mlp_hidden)
    parallel_residual: bool | str = False  # or the config flag that says (GPT-NeoX: "use_parallel_residual")
    attention: str = PROBE_ATTENTION  # attention implementation in probe forwards; "eager" = the model's own


def resolve(root: nn.Module, path: str, what: str) -> nn.Module:
    """`root`'s submodule at dotted `path`; a clear error naming the missing part (`what`: the spec field)."""
    module = root
    for i, part in enumerate(path.split(".")):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            found = path.split(".")[:i]
            at = f"'{'.'.join(found)}'" if found else type(root).__name__
            raise LookupError(f"DecoderSpec.{what}={path!r}: {at} has no submodule {part!r}")
        module = child
    return module


def _is_norm(module: nn.Module) -> bool:
    # Foreign models bring their own norm classes (LlamaRMSNorm, ...): recognized by class name.
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith("Norm")


class ReplayBranch(nn.Module):
    """F(h) = module(norm(h), *args, **kwargs) with the arguments `module` received in the probe forward.

    Its parameters are the norm's and the module's own (shared with the model), so
    `torch.func.functional_call` can evaluate it at other parameter values.
    """

    def __init__(self, norm: nn.Module, module: nn.Module, calls: dict, key: tuple[int, str]):
        super().__init__()
        self.norm, self.module = norm, module
        self._calls, self._key = calls, key  # shared record, filled by DecoderAdapter.probing()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._key not in self._calls:
            raise RuntimeError(f"branch {self._key} has no recorded arguments: run a probe forward inside "
                               "adapter.probing() first (ProbeSession does)")
        args, kwargs, positional, batch = self._calls[self._key]

        def fit(value: Any) -> Any:
            # The linearization may use the first few probe sequences only: cut per-sequence arguments
            # (the attention mask) to match, and evaluate in h's dtype (float64 for the ratios).
            if not isinstance(value, torch.Tensor):
                return value
            if value.dim() and value.shape[0] == batch and h.shape[0] < batch:
                value = value[: h.shape[0]]
            return value.to(h.dtype) if value.is_floating_point() else value

        args, kwargs = tree_map(fit, (args, kwargs))
        x = self.norm(h)
        out = self.module(x, *args, **kwargs) if positional else self.module(*args, hidden_states=x, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out


def _record(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value).__name__.endswith("Cache"):  # never replay into (or update) a KV cache
        return None
    return value


class DecoderAdapter(ModelAdapter):
    """A pre-norm decoder described by a `DecoderSpec` (Hugging Face or any nn.Module returning logits)."""

    def __init__(self, model: nn.Module, spec: DecoderSpec | None = None):
        """`spec`: None for a family `probes.families` knows (looked up by `config.model_type`)."""
        if spec is None:
            from probes.families import spec_for

            spec = spec_for(model)
        self.model, self.spec = model, spec
        blocks = resolve(model, spec.blocks, "blocks")
        if not isinstance(blocks, nn.ModuleList | nn.Sequential) or len(blocks) == 0:
            raise LookupError(f"DecoderSpec.blocks={spec.blocks!r} is a {type(blocks).__name__}, "
                              "not a non-empty list of blocks")
        self.blocks, self.depth = blocks, len(blocks)
        self.block_pattern = re.escape(spec.blocks) + r"\.(\d+)\."
        self.parts = [{field: resolve(b, getattr(spec, field), field) for field in ("attn", "attn_norm", "mlp",
                                                                                   "mlp_norm")} for b in blocks]
        self.final_norm = resolve(model, spec.final_norm, "final_norm")
        flag = spec.parallel_residual
        self.parallel = bool(getattr(getattr(model, "config", None), flag, False) if isinstance(flag, str) else flag)
        self._calls: dict[tuple[int, str], tuple] = {}
        self._branches = {
            (layer, name): ReplayBranch(p[f"{name}_norm"], p[name], self._calls, (layer, name))
            for layer, p in enumerate(self.parts) for name in ("attn", "mlp")
        }

    # --- sites ----------------------------------------------------------------------------------------
    def sites(self) -> dict[tuple[int, str], SiteSpec]:
        out = {(-1, EMBED_SITE): SiteSpec(self.blocks[0], "input"),
               (-1, FINAL_SITE): SiteSpec(self.final_norm, "input")}
        for layer, (block, p) in enumerate(zip(self.blocks, self.parts)):
            out[(layer, "resid_pre")] = SiteSpec(block, "input")
            # These models add their branches with multiplier 1: what is added is the raw branch output.
            out[(layer, "attn_out")] = out[(layer, "attn_add")] = SiteSpec(p["attn"], "output")
            if not self.parallel:  # parallel residual: no stream between the two branches
                out[(layer, "resid_mid")] = SiteSpec(p["mlp_norm"], "input")
            out[(layer, "mlp_out")] = out[(layer, "mlp_add")] = SiteSpec(p["mlp"], "output")
            out[(layer, "resid_post")] = SiteSpec(block, "output")
        return out

    def internal_sites(self, layer: int) -> dict[str, SiteSpec]:
        p = self.parts[layer]
        return {"mlp_hidden": SiteSpec(resolve(p["mlp"], self.spec.mlp_out_proj, "mlp_out_proj"), "input"),
                "attn_mix": SiteSpec(resolve(p["attn"], self.spec.attn_out_proj, "attn_out_proj"), "input")}

    def branch(self, layer: int, name: str) -> tuple[nn.Module, str]:
        source = "resid_pre" if name == "attn" or self.parallel else "resid_mid"
        return self._branches[(layer, name)], source

    # --- forward --------------------------------------------------------------------------------------
    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if hasattr(self.model, "config") else {}
        out = self.model(batch[:, :-1], **extra)
        logits = getattr(out, "logits", out)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def _attention(self) -> contextlib.AbstractContextManager:
        if hasattr(getattr(self.model, "config", None), "_attn_implementation"):
            return attention_implementation(self.model, self.spec.attention)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """The probe forward: eager-style attention, and every branch module's arguments recorded."""
        handles = []

        def hook(module, args, kwargs, key):
            positional = bool(args)
            hidden = args[0] if positional else kwargs["hidden_states"]
            rest = {k: _record(v) for k, v in kwargs.items() if k != "hidden_states"}
            self._calls[key] = (tuple(_record(a) for a in args[1:]), rest, positional, hidden.shape[0])

        try:
            for layer, p in enumerate(self.parts):
                for name in ("attn", "mlp"):
                    handles.append(p[name].register_forward_pre_hook(
                        lambda m, a, k, key=(layer, name): hook(m, a, k, key), with_kwargs=True))
            with self._attention():
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def linearizable(self) -> Iterator[None]:
        """Forward-mode AD through the branches: the probe attention (no fused kernel), no dropout."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._attention():
                yield
        finally:
            self.model.train(was_training)

    # --- parameters -----------------------------------------------------------------------------------
    def parameter_roles(self) -> dict[str, str]:
        """Roles by module membership (tied weights appear once, under the embedding; GQA's k/v
        projections are hidden weights like any other matrix in a block)."""
        owner = {id(p): n for n, p in self.model.named_parameters()}
        roles: dict[str, str] = {}

        def assign(module: nn.Module | None, role: str) -> None:
            for p in [] if module is None else module.parameters():
                if id(p) in owner:
                    roles.setdefault(owner[id(p)], role)

        assign(resolve(self.model, self.spec.embedding, "embedding"), "embedding")
        if self.spec.position_embedding:
            assign(resolve(self.model, self.spec.position_embedding, "position_embedding"), "position_embedding")
        assign(self.final_norm, "final_norm")
        with contextlib.suppress(LookupError):  # a model without an output head has no unembedding
            assign(resolve(self.model, self.spec.unembedding, "unembedding"), "unembedding")
        for block in self.blocks:
            for module in block.modules():
                if _is_norm(module):
                    assign(module, "block_norm")
            for name, p in block.named_parameters():
                if id(p) in owner:
                    roles.setdefault(owner[id(p)], "hidden_bias" if name.endswith("bias") else "hidden_weight")
        for name in owner.values():
            roles.setdefault(name, "other")  # outside every part the spec names: not a Table 1 role
        return roles

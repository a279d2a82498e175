"""A probe-time attention for Hugging Face models, through the transformers attention-function registry.

    with recorded_attention(model) as records:   # records: layer → (max logit, entropy, normalized entropy)
        model(tokens)

Inside the block the model runs `probe_eager`, an eager attention registered with
`AttentionInterface` (and the eager mask function with `AttentionMaskInterface`, so the model builds
its usual additive mask for it). It computes what eager attention computes from the query, key and
value the model's own attention module hands it (after its rotary embedding, with its scaling and
mask), and reduces the pre-softmax scores per head on the device. No family's masks or rotary
embeddings are re-implemented; grouped-query attention repeats the key/value heads as eager does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from probes.health import attention_reductions

PROBE_ATTENTION = "probe_eager"
_records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def probe_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (b, heads, t, d) → ((b, t, heads, d), probs), recording the scores' reductions."""
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:  # grouped-query attention
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scaling
    allowed = None
    weights = scores
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            allowed, weights = mask, scores.masked_fill(~mask, float("-inf"))
        else:
            allowed, weights = mask > torch.finfo(mask.dtype).min / 2, scores + mask
    if _records is not None:
        layer = getattr(module, "layer_idx", None)
        _records[len(_records) if layer is None else int(layer)] = attention_reductions(scores.detach(), allowed)
    probs = weights.float().softmax(dim=-1).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def register() -> None:
    """Register `probe_eager` with the transformers attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)
    if PROBE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(PROBE_ATTENTION, eager_mask)


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Run `model`'s attention as `probe_eager` inside the block; yields layer → per-head reductions."""
    global _records
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_ATTENTION)
    _records = {}
    try:
        yield _records
    finally:
        _records = None
        model.set_attn_implementation(previous)

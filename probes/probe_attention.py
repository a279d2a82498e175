"""A probe-time attention for Hugging Face models: eager attention that forward-mode AD can go through.

Registered with transformers' attention registry (`AttentionInterface`, and `AttentionMaskInterface` so
that the model builds the same explicit 4-D causal mask it builds for "eager") under the name
`PROBE_ATTENTION`. An adapter switches a model's `config._attn_implementation` to it for the probe
forward and for the linearization (`probe_attention(model)`), never for a training step.

Why not the models' own "eager": Llama-family eager attention computes its softmax in float32 even when
the model runs in float64, which puts a ~1e-7 relative floor under a float64 linearization (measured:
attention-branch ratios agreed with finite differences to ~2e-7 where MLP ratios agreed to 3e-8).
Here the softmax runs in the query's dtype. Masks, rotary embeddings and GQA stay the model's own: the
mask arrives as an argument, rotary embeddings are applied before this function is called, and
key/value heads are repeated to the query heads as every eager implementation does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

PROBE_ATTENTION = "completep_probe"
# Set by probes.hf_attention.recorded_attention: called with (module, pre-softmax scores, allowed mask
# or None) at every attention call, for the training-health reductions; None otherwise.
score_observer: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None] | None = None


def probe_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager scaled dot-product attention; query (b, heads, t, d), key/value (b, kv_heads, s, d).

    Returns (output (b, t, heads, d), attention probabilities (b, heads, t, s)), as transformers'
    attention functions do. Refuses the options whose arithmetic it does not implement.
    """
    for option in ("softcap", "s_aux", "sinks"):
        if kwargs.get(option) is not None:
            raise NotImplementedError(f"the probe attention does not implement attention {option!r}; "
                                      "give the family's DecoderSpec attention='eager'")
    repeats = query.shape[1] // key.shape[1]  # grouped-query attention: kv heads shared by query heads
    if repeats > 1:
        key = key.repeat_interleave(repeats, dim=1)
        value = value.repeat_interleave(repeats, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # aten.mul.Scalar: `* scale` without a lazy zero tangent for the float under forward-mode AD (see the
    # math path of trainer.model.CausalSelfAttention); the same kernel and numbers.
    logits = torch.ops.aten.mul.Scalar(torch.matmul(query, key.transpose(2, 3)), scale)
    scores, allowed = logits, None
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        # additive float mask (what eager_mask builds), or a boolean one (True = attend) passed by a caller
        if mask.dtype == torch.bool:
            allowed, logits = mask, logits.masked_fill(~mask, float("-inf"))
        else:
            allowed, logits = mask > torch.finfo(mask.dtype).min / 2, logits + mask
    if score_observer is not None:
        score_observer(module, scores.detach(), allowed)
    probs = logits.softmax(dim=-1)  # in the query's dtype: float64 stays float64
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


_registered = False


def register() -> None:
    """Register the probe attention (and the eager mask for it) with transformers, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE_ATTENTION, eager_mask)
    _registered = True


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` with attention implementation `name` inside the block; restored on exit.

    transformers reads `config._attn_implementation` at every forward (for the mask and the attention
    function), so switching it is enough; a training step outside the block is untouched.
    """
    if name == PROBE_ATTENTION:
        register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous

"""Training-health reductions of a Hugging Face model's attention, through the probe attention.

    with recorded_attention(model) as records:   # records: layer → (max logit, entropy, normalized entropy)
        model(tokens)

Inside the block the model runs the probe attention of `probes.probe_attention` (an eager attention
registered with transformers' `AttentionInterface`, the model's own mask, rotary embeddings and GQA,
softmax in the query's dtype); its pre-softmax scores (after the scaling, before the mask) are reduced
per head on the device. No family's masks or rotary embeddings are re-implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from probes import probe_attention
from probes.health import attention_reductions


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Run `model`'s attention as the probe attention inside the block; yields layer → per-head reductions."""
    records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def observe(module: nn.Module, scores: torch.Tensor, allowed: torch.Tensor | None) -> None:
        layer = getattr(module, "layer_idx", None)
        records[len(records) if layer is None else int(layer)] = attention_reductions(scores, allowed)

    previous = probe_attention.score_observer
    probe_attention.score_observer = observe
    try:
        with probe_attention.attention_implementation(model, probe_attention.PROBE_ATTENTION):
            yield records
    finally:
        probe_attention.score_observer = previous

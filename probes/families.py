"""The decoder families the probes know by name: one `DecoderSpec` per Hugging Face `model_type`.

`adapter_for(model)` looks the model's `config.model_type` up here, so these models need no user code.
Adding a family is adding an entry (and a tiny-config case to tests/probes/test_adapter_families.py).
"""

from __future__ import annotations

from torch import nn

from probes.decoder import DecoderAdapter, DecoderSpec

# Llama and the families built like it: RMSNorm, SwiGLU MLP, rotary embeddings, GQA.
LLAMA_LIKE = DecoderSpec(blocks="model.layers", attn="self_attn", attn_norm="input_layernorm", mlp="mlp",
                         mlp_norm="post_attention_layernorm", final_norm="model.norm", embedding="model.embed_tokens")

FAMILIES: dict[str, DecoderSpec] = {
    # LayerNorm, GELU MLP (Conv1D layers), learned positions, tied embeddings.
    "gpt2": DecoderSpec(blocks="transformer.h", attn="attn", attn_norm="ln_1", mlp="mlp", mlp_norm="ln_2",
                        final_norm="transformer.ln_f", embedding="transformer.wte",
                        position_embedding="transformer.wpe", attn_out_proj="c_proj", mlp_out_proj="c_proj"),
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,  # + sliding-window mask (the model builds it; the replay passes it on)
    "qwen2": LLAMA_LIKE,  # + q/k/v biases
    "qwen3": LLAMA_LIKE,  # + RMSNorm on queries and keys inside the attention (block norms)
    # LayerNorm, GELU MLP, partial rotary; attention and MLP in parallel unless the config says otherwise.
    "gpt_neox": DecoderSpec(blocks="gpt_neox.layers", attn="attention", attn_norm="input_layernorm", mlp="mlp",
                            mlp_norm="post_attention_layernorm", final_norm="gpt_neox.final_layer_norm",
                            embedding="gpt_neox.embed_in", attn_out_proj="dense", mlp_out_proj="dense_4h_to_h",
                            parallel_residual="use_parallel_residual"),
}

HOW_TO = ("describe it in a DecoderSpec (its block list, attention and MLP modules and their norms, final norm "
          "and embedding: about 10 lines, see README 'Probes on a model you did not build') and call "
          "adapter_for(model, spec=spec)")


def spec_for(model: nn.Module) -> DecoderSpec:
    """The known family's spec for `model`, or a LookupError saying what is missing and what to do."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    what = f"model_type {model_type!r}" if model_type else "no Hugging Face config.model_type"
    raise LookupError(f"no probe adapter for {type(model).__name__} ({what}; known: {', '.join(FAMILIES)}); "
                      + HOW_TO)


class HFGPT2Adapter(DecoderAdapter):
    """A Hugging Face `GPT2LMHeadModel` (kept under its old name; `adapter_for` picks it by itself)."""

    def __init__(self, model: nn.Module, spec: DecoderSpec | None = None):
        super().__init__(model, spec or FAMILIES["gpt2"])

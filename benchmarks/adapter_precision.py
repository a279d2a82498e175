"""How exact are the probes' branches on Hugging Face decoders? `python -m benchmarks.adapter_precision`

For each family (tiny configs, float64, CPU, no download) and each layer's attention branch:
- `replay`: the branch the probes linearize (the model's own attention replayed with its recorded
  arguments), relative to the model's own attention output in a normal forward;
- `unmasked`: what the old GPT-2 adapter computed, attn(ln(h)) without the arguments (eager attention
  applies only the mask it is passed), relative to the same output;
- `eager softmax`: the replayed branch under the model's own "eager" attention, which for Llama-style
  models computes the softmax in float32, relative to the same output: the floor that the probe
  attention (softmax in the query's dtype) removes.
Prints one line per family: the worst layer of each.
"""

from __future__ import annotations

import torch
import transformers

from probes.adapters import adapter_for
from probes.probe_attention import attention_implementation

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4,
                                            bos_token_id=0, eos_token_id=0),
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**COMMON),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def measure(family: str, seq: int = 32) -> dict[str, float]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).double().eval()
    adapter = adapter_for(model)
    batch = torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(1))
    seen, handles = {}, []
    for layer, p in enumerate(adapter.parts):  # the model's own attention: its norm's input, its output
        handles.append(p["attn_norm"].register_forward_pre_hook(lambda m, a, k=layer: seen.__setitem__((k, 0), a[0])))
        handles.append(p["attn"].register_forward_hook(lambda m, a, o, k=layer: seen.__setitem__((k, 1), o[0])))
    model(batch[:, :-1], use_cache=False)
    for h in handles:
        h.remove()
    with adapter.probing():
        adapter.loss(batch)
    worst = {"replay": 0.0, "unmasked": 0.0 if family == "gpt2" else float("nan"), "eager softmax": 0.0}
    for layer, p in enumerate(adapter.parts):
        h, own = seen[(layer, 0)], seen[(layer, 1)]
        branch, _ = adapter.branch(layer, "attn")
        with adapter.linearizable():
            worst["replay"] = max(worst["replay"], rel(branch(h), own))
        with attention_implementation(model, "eager"):
            worst["eager softmax"] = max(worst["eager softmax"], rel(branch(h), own))
            if family == "gpt2":  # its attention takes the hidden states alone; the others need rotary cos/sin
                worst["unmasked"] = max(worst["unmasked"], rel(p["attn"](p["attn_norm"](h))[0], own))
    return worst


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; float64, seq 32, width 64, depth 4")
    for family in CONFIGS:
        worst = measure(family)
        print(f"{family:<9} " + "  ".join(f"{k} {v:.2g}" for k, v in worst.items()))


if __name__ == "__main__":
    main()

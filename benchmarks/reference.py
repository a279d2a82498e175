"""The baseline: a minimal GPT training loop with the same architecture and size, and nothing else.

Pre-LN blocks (LayerNorm with bias, causal SDPA attention with d_head 64, GELU MLP of width 4N),
learned positions, untied unembedding, byte vocabulary: the shape of `trainer.model.GPT`, written the
plain way (no hook sites, no branch or output multipliers, no einops, one AdamW group, constant LR).
The step does what any training loop must: forward, backward, clip the global gradient norm, AdamW
step, zero the gradients; the loss reaches the host only every `log_every` steps. Against it,
`Trainer.train_step` shows the cost of the parameterization code (Table 1 groups, multipliers,
schedule, hook sites, metrics buffer).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model import VOCAB_SIZE


class ReferenceBlock(nn.Module):
    def __init__(self, width: int, d_head: int):
        super().__init__()
        self.d_head = d_head
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, n // self.d_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3×(b, h, t, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(b, t, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, width: int, depth: int, seq_len: int, d_head: int = 64, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(ReferenceBlock(width, d_head) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class ReferenceLoop:
    """`step(batch)`: one optimizer update on a (batch, seq_len + 1) token batch, in `grad_accum` chunks."""

    def __init__(self, model: nn.Module, device: torch.device, lr: float = 1e-3, grad_clip: float = 1.0,
                 grad_accum: int = 1, log_every: int = 10, bf16: bool = False, compile_model: bool = False,
                 compile_backend: str = "inductor"):
        self.model = model.to(device)
        self.train_model = torch.compile(self.model, backend=compile_backend) if compile_model else self.model
        fused = True if device.type == "cuda" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                           fused=fused)
        self.device, self.grad_clip, self.grad_accum, self.log_every = device, grad_clip, grad_accum, log_every
        self.bf16 = bf16
        self.n = 0
        self.losses: list[torch.Tensor] = []

    def step(self, batch: torch.Tensor) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        loss_sum = torch.zeros((), device=self.device)
        for micro in batch.chunk(self.grad_accum):
            with autocast:
                loss = self.train_model(micro[:, :-1], micro[:, 1:]) / self.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss_sum)
        self.n += 1
        if self.n % self.log_every == 0:  # the one host transfer, as the trainer's flush_metrics
            torch.stack(self.losses).cpu()
            self.losses.clear()

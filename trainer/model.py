"""A pre-LN decoder-only GPT whose residual branches are pure functions with named hook sites.

Block l computes (Table 1, α-parameterization):
    resid_mid  = resid_pre + m_L^(−α) · MHA(LN(resid_pre))     attn_out = MHA(LN(·)), attn_add = m_L^(−α)·attn_out
    resid_post = resid_mid + m_L^(−α) · MLP(LN(resid_mid))     mlp_out  = MLP(LN(·)),  mlp_add  = m_L^(−α)·mlp_out
The hook sites are identity modules, so a probe sees what the stream actually receives (`*_add`), not
only the raw branch output before the multiplier (which is all a hook on the branch module sees).
Each branch (`attn_branch`, `mlp_branch`) owns its LayerNorm and weights, so
`torch.func.functional_call(block.attn_branch, params, (h,))` is the branch as a pure function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from trainer.parameterization import Parameterization, Role

VOCAB_SIZE = 256  # byte-level tokens
ATTENTION_BACKENDS = ("sdpa", "math")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture only; every scaling rule comes from the Parameterization."""

    seq_len: int = 128  # maximum context length (learned positions)
    vocab_size: int = VOCAB_SIZE  # byte-level
    tie_embeddings: bool = False  # the paper's runs used untied embedding/unembedding
    ln_eps: float = 1e-5  # LayerNorm ε


class HookPoint(nn.Module):
    """An identity whose forward hooks are the probes' only way into the model's activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with a switch between fused SDPA and an explicit math path.

    The math path exists because forward-mode AD (torch.func.jvp) has no rule for the fused kernels.
    """

    def __init__(self, width: int, d_head: int, scale: float):
        super().__init__()
        self.d_head, self.scale = d_head, scale
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.backend = "sdpa"
        # Probe sites on the math path only (the fused training path never calls them): pre-softmax
        # scores after scale and causal mask, and the attention pattern, both (b, heads, t, t).
        self.logits_hook, self.probs_hook = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, d=self.d_head)
        if self.backend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            t = x.shape[1]
            # (b, h, t, t). aten.mul.Scalar is `* self.scale` (the same kernel, the same numbers); under
            # forward-mode AD (the probes' JVPs) `tensor * float` would give the float a lazy zero tangent,
            # evaluated through Python meta kernels: 6x slower at small shapes (benchmarks/RESULTS.md).
            logits = torch.ops.aten.mul.Scalar(q @ k.transpose(-2, -1), self.scale)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            logits = self.logits_hook(logits.masked_fill(~causal, float("-inf")))
            y = self.probs_hook(logits.softmax(dim=-1)) @ v
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class AttentionBranch(nn.Module):
    """MHA(LN(x)): the raw attention branch, before the branch multiplier."""

    def __init__(self, width: int, d_head: int, scale: float, ln_eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.attn = CausalSelfAttention(width, d_head, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln(x))


class MLPBranch(nn.Module):
    """MLP(LN(x)) with a GELU hidden layer of width 4N: the raw MLP branch."""

    def __init__(self, width: int, ln_eps: float):
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(self.ln(x))))


class Block(nn.Module):
    """One pre-LN transformer block with both branches scaled by the same multiplier."""

    SITES = ("resid_pre", "attn_out", "attn_add", "resid_mid", "mlp_out", "mlp_add", "resid_post")

    def __init__(self, width: int, d_head: int, attn_scale: float, branch_multiplier: float, ln_eps: float):
        super().__init__()
        self.branch_multiplier = branch_multiplier
        self.attn_branch = AttentionBranch(width, d_head, attn_scale, ln_eps)
        self.mlp_branch = MLPBranch(width, ln_eps)
        self.hooks = nn.ModuleDict({site: HookPoint() for site in self.SITES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hooks
        x = h["resid_pre"](x)
        a = h["attn_out"](self.attn_branch(x))
        x = h["resid_mid"](x + h["attn_add"](self.branch_multiplier * a))
        m = h["mlp_out"](self.mlp_branch(x))
        return h["resid_post"](x + h["mlp_add"](self.branch_multiplier * m))


class GPT(nn.Module):
    """Decoder-only pre-LN GPT built and initialized from a Parameterization (Table 1)."""

    def __init__(self, param: Parameterization, config: ModelConfig | None = None):
        super().__init__()
        self.param, self.config = param, config or ModelConfig()
        cfg, n = self.config, param.width
        self.wte = nn.Embedding(cfg.vocab_size, n)
        self.wpe = nn.Embedding(cfg.seq_len, n)
        self.embed_hook = HookPoint()  # the stream entering block 0
        self.blocks = nn.ModuleList(
            Block(n, param.d_head, param.attention_scale, param.branch_multiplier, cfg.ln_eps)
            for _ in range(param.depth)
        )
        self.final_hook = HookPoint()  # the last block's output: the final residual stream
        self.ln_f = nn.LayerNorm(n, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(n, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.output_multiplier = param.output_multiplier
        self.reset_parameters()

    # --- roles and init --------------------------------------------------------------------------
    def parameter_roles(self) -> dict[str, Role]:
        """Role of every (deduplicated) parameter, by the module that owns it, not by name suffix."""
        roles: dict[int, Role] = {}

        def tag(module: nn.Module, role_weight: Role, role_bias: Role | None = None) -> None:
            roles.setdefault(id(module.weight), role_weight)
            if getattr(module, "bias", None) is not None:
                roles.setdefault(id(module.bias), role_bias or role_weight)

        tag(self.wte, Role.EMBEDDING)
        tag(self.wpe, Role.POSITION_EMBEDDING)
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.LayerNorm):
                    tag(module, Role.BLOCK_NORM)
                elif isinstance(module, nn.Linear):
                    tag(module, Role.HIDDEN_WEIGHT, Role.HIDDEN_BIAS)
        tag(self.ln_f, Role.FINAL_NORM)
        tag(self.lm_head, Role.UNEMBEDDING)
        missing = [name for name, p in self.named_parameters() if id(p) not in roles]
        if missing:
            raise AssertionError(f"parameters without a role: {missing}")
        return {name: roles[id(p)] for name, p in self.named_parameters()}

    def norm_bias_names(self) -> set[str]:
        """LayerNorm biases: they share their gain's role (Table 1 has one Pre-LN row) but start at 0."""
        biases = {id(m.bias) for m in self.modules() if isinstance(m, nn.LayerNorm) and m.bias is not None}
        return {name for name, p in self.named_parameters() if id(p) in biases}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize every parameter from its role's Table 1 rule."""
        params = dict(self.named_parameters())
        norm_biases = self.norm_bias_names()
        for name, role in self.parameter_roles().items():
            rule = self.param.rule(role)
            p = params[name]
            if rule.init == "normal":
                nn.init.normal_(p, mean=0.0, std=rule.init_std)
            elif rule.init == "ones" and name not in norm_biases:
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    # --- attention backend -----------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
        for block in self.blocks:
            block.attn_branch.attn.backend = backend

    @contextlib.contextmanager
    def attention_backend(self, backend: str) -> Iterator[None]:
        """Temporarily switch every block's attention backend (e.g. to "math" for torch.func.jvp)."""
        previous = self.blocks[0].attn_branch.attn.backend if len(self.blocks) else "sdpa"
        self.set_attention_backend(backend)
        try:
            yield
        finally:
            self.set_attention_backend(previous)

    # --- forward ---------------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.embed_hook(self.wte(idx) + self.wpe(pos))

    def logits(self, final_stream: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(final_stream)) * self.output_multiplier

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, t, vocab); with `targets`, the mean next-token cross-entropy instead."""
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's {self.config.seq_len}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.logits(self.final_hook(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n


def flops_per_token(param: Parameterization, seq_len: int, vocab_size: int = VOCAB_SIZE) -> float:
    """Training FLOPs per token: 6·(non-embedding matmul params) + attention 12·L·N·T (PaLM appendix B)."""
    n, layers = param.width, param.depth
    matmul_params = layers * 12 * n * n + n * vocab_size  # blocks + unembedding
    return 6 * matmul_params + 12 * layers * n * seq_len


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module behind DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


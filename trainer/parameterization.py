"""Parameterizations as data: the paper's Table 1 as one pure function of role and shape.

Dey et al. 2025 ("Don't be lazy: CompleteP ...", arXiv 2505.01618), Table 1, with
m_N = N / N_base and m_L = L / L_base:

| role                     | SP            | µP                 | α (CompleteP: α = 1)                  |
|--------------------------|---------------|--------------------|---------------------------------------|
| embedding init std / LR  | σ / η         | σ / η              | σ / η                                 |
| block LN LR              | η             | η                  | η·m_L^(α−1)                           |
| hidden weight init std   | σ             | σ·m_N^(−1/2)       | σ·m_N^(−1/2)                          |
| hidden weight LR         | η             | η·m_N^(−1)         | η·m_N^(−1)·m_L^(α−1)                  |
| hidden bias LR           | η             | η                  | η·m_L^(α−1)                           |
| hidden weight WD         | λ             | λ·m_N              | λ·m_N                                 |
| branch multiplier        | 1             | 1                  | m_L^(−α)                              |
| unembedding forward      | 1             | m_N^(−1)           | m_N^(−1)                              |
| Adam ε (block params)    | ε             | ε·m_N^(−1)         | ε·m_N^(−1)·m_L^(−α)                   |
| Adam ε (other, Eq. 40)   | ε             | ε·m_N^(−1)         | ε·m_N^(−1)                            |

Rows the table does not give, and what we do (see the spec, §1):
- LayerNorm gains start at 1 and biases at 0 (the table's "σ²_base" for Pre-LN is read as the
  reference code does); their "init std" is reported as 0.
- Weight decay is 0 for norms and biases; embeddings and unembedding get λ (reference code).
- Adam ε outside the blocks (embeddings, unembedding, final LN): ε_base·m_N^(−1), the paper's Eq. 40
  (no depth factor; ε_base for SP and for the µP reference-code variant, which scale no ε with width).
  This is also what the authors' code does since their dated fix on branch `completep` (spec §1).
  `eps_scope="blocks-only"` keeps ε_base unscaled outside the blocks (this toolkit's earlier default,
  Table 1 read literally); `eps_scope="all"` applies the block ε to every group, as the authors' code
  did before that fix.
- Attention logit scale: 1/d_head for µP and α, 1/sqrt(d_head) for SP (reference code).
- `mup_variant="reference-code"` reproduces the authors' µP-only mode: ε not scaled with width and
  hidden WD left at λ (both depart from Table 1's µP column).

Weight decay is PyTorch's AdamW form (decoupled but multiplied by the group LR), as in the paper.

Debug ablations (`ablate`, comma-separated; empty by default): each breaks one Table 1 rule on
purpose, so that `diagnose conform` can be shown to catch it. Never use them for real training.
- `no-depth-lr`: the in-block LRs lose their m_L^(α−1) factor (a no-op at α = 1, where it is 1).
- `no-branch-multiplier`: both residual branches are added with multiplier 1 instead of m_L^(−α).
- `global-eps`: every group gets the unscaled ε_base (no m_N^(−1) m_L^(−α) for block parameters);
  it only matters where ε_base is comparable to Adam's √v̂.
- `sp-init`: hidden weights start with std σ_base (SP) instead of σ_base·m_N^(−1/2); LRs unchanged.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

from trainer.errors import ConfigError

PARAMETERIZATIONS = ("sp", "mup", "alpha")
# Named presets that resolve to (parameterization, α).
ALIASES = {"depth-mup": ("alpha", 0.5), "completep": ("alpha", 1.0)}
EPS_SCOPES = ("eq40", "blocks-only", "all")
# Stored configs written before Eq. 40 became the default say "blocks" for what is now "blocks-only".
LEGACY_EPS_SCOPES = {"blocks": "blocks-only"}
MUP_VARIANTS = ("table", "reference-code")
ATTN_SCALES = ("auto", "inv-d-head", "inv-sqrt-d-head")
# Deliberately broken rules (see the module docstring), for testing the conformance check.
ABLATIONS = ("no-depth-lr", "no-branch-multiplier", "global-eps", "sp-init")


class Role(str, enum.Enum):
    """What a parameter is, for the purpose of Table 1. Assigned once when the model is built."""

    EMBEDDING = "embedding"
    POSITION_EMBEDDING = "position_embedding"
    BLOCK_NORM = "block_norm"
    HIDDEN_WEIGHT = "hidden_weight"
    HIDDEN_BIAS = "hidden_bias"
    FINAL_NORM = "final_norm"
    UNEMBEDDING = "unembedding"

    @property
    def in_block(self) -> bool:
        return self in (Role.BLOCK_NORM, Role.HIDDEN_WEIGHT, Role.HIDDEN_BIAS)


@dataclass(frozen=True)
class RoleRule:
    """What Table 1 prescribes for one role at one shape.

    init: "normal" (std `init_std`), "ones" or "zeros". `lr_mult` multiplies η_base (and the
    schedule); `weight_decay` is the AdamW λ of the group; `eps` is Adam's ε.
    """

    role: Role
    init: str
    init_std: float
    lr_mult: float
    lr: float
    weight_decay: float
    eps: float


@dataclass(frozen=True)
class Parameterization:
    """A parameterization at one shape. Pure data; every number the model and optimizer use
    comes from its methods, and so does `diagnose audit`."""

    name: str = "alpha"  # sp | mup | alpha
    alpha: float = 1.0  # depth exponent α in [0.5, 1]; ignored for sp and mup
    width: int = 256  # N, the residual-stream width
    depth: int = 2  # L, the number of transformer blocks
    base_width: int = 256  # N_base
    base_depth: int = 2  # L_base
    sigma_base: float = 0.02  # σ_base, init std at the base shape
    lr_base: float = 2**-8  # η_base
    wd_base: float = 0.0  # λ_base (AdamW, PyTorch form)
    eps_base: float = 1e-12  # ε_base
    d_head: int = 64  # attention head size (fixed; width grows by adding heads)
    eps_scope: str = "eq40"  # eq40 (Table 1 + Eq. 40) | blocks-only (ε_base outside blocks) | all (pre-fix code)
    mup_variant: str = "table"  # table | reference-code (µP: ε and WD not width-scaled)
    attn_scale: str = "auto"  # auto | inv-d-head | inv-sqrt-d-head
    ablate: str = ""  # debug only: comma-separated ABLATIONS that break Table 1 on purpose ("" = none)

    def __post_init__(self) -> None:
        if self.eps_scope in LEGACY_EPS_SCOPES:  # frozen: normalise an old name before validating
            object.__setattr__(self, "eps_scope", LEGACY_EPS_SCOPES[self.eps_scope])
        validate(self)

    # --- multipliers -------------------------------------------------------------------------------
    @property
    def m_n(self) -> float:
        return self.width / self.base_width

    @property
    def m_l(self) -> float:
        return self.depth / self.base_depth

    @property
    def ablations(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.ablate.split(",") if a.strip())

    @property
    def uses_depth(self) -> bool:
        return self.name == "alpha"

    @property
    def label(self) -> str:
        return f"alpha={self.alpha:g}" if self.uses_depth else self.name

    @property
    def branch_multiplier(self) -> float:
        """m_L^(−α) on both residual branches (1 for SP and µP)."""
        if "no-branch-multiplier" in self.ablations:
            return 1.0
        return self.m_l**-self.alpha if self.uses_depth else 1.0

    @property
    def output_multiplier(self) -> float:
        """m_N^(−1) on the unembedding's output (µP and α), 1 for SP."""
        return 1.0 if self.name == "sp" else 1.0 / self.m_n

    @property
    def attention_scale(self) -> float:
        rule = self.attn_scale
        if rule == "auto":
            rule = "inv-sqrt-d-head" if self.name == "sp" else "inv-d-head"
        return 1.0 / self.d_head if rule == "inv-d-head" else 1.0 / math.sqrt(self.d_head)

    def _depth_lr(self) -> float:
        if "no-depth-lr" in self.ablations:
            return 1.0
        return self.m_l ** (self.alpha - 1.0) if self.uses_depth else 1.0

    def _width_eps(self) -> float:
        """ε_base·m_N^(−1) (Eq. 40), or ε_base where no ε is width-scaled (SP, µP reference-code)."""
        unscaled = self.name == "sp" or (self.name == "mup" and self.mup_variant == "reference-code")
        if unscaled or "global-eps" in self.ablations:
            return self.eps_base
        return self.eps_base / self.m_n

    def _block_eps(self) -> float:
        if "global-eps" in self.ablations:  # debug: one unscaled ε, as if Table 1's ε rule were missing
            return self.eps_base
        eps = self._width_eps()
        return eps * self.m_l**-self.alpha if self.uses_depth else eps

    def _other_eps(self) -> float:
        """Adam ε of the groups outside the residual blocks, per `eps_scope`."""
        if self.eps_scope == "all":
            return self._block_eps()
        return self.eps_base if self.eps_scope == "blocks-only" else self._width_eps()

    # --- Table 1 ---------------------------------------------------------------------------------
    def rule(self, role: Role) -> RoleRule:
        """Table 1 for one role: init, LR, weight decay and Adam ε at this shape."""
        sigma, m_n, eta, lam = self.sigma_base, self.m_n, self.lr_base, self.wd_base
        width_scaled = self.name != "sp"
        block_eps = self._block_eps()
        other_eps = self._other_eps()
        if role in (Role.EMBEDDING, Role.POSITION_EMBEDDING, Role.UNEMBEDDING):
            init, std, lr_mult, wd, eps = "normal", sigma, 1.0, lam, other_eps
        elif role is Role.FINAL_NORM:
            init, std, lr_mult, wd, eps = "ones", 0.0, 1.0, 0.0, other_eps
        elif role is Role.BLOCK_NORM:
            init, std, lr_mult, wd, eps = "ones", 0.0, self._depth_lr(), 0.0, block_eps
        elif role is Role.HIDDEN_BIAS:
            init, std, lr_mult, wd, eps = "zeros", 0.0, self._depth_lr(), 0.0, block_eps
        elif role is Role.HIDDEN_WEIGHT:
            std = sigma / math.sqrt(m_n) if width_scaled and "sp-init" not in self.ablations else sigma
            lr_mult = (1.0 / m_n if width_scaled else 1.0) * self._depth_lr()
            wd_scaled = width_scaled and not (self.name == "mup" and self.mup_variant == "reference-code")
            init, wd, eps = "normal", lam * m_n if wd_scaled else lam, block_eps
        else:  # pragma: no cover - Role is a closed enum
            raise ValueError(f"unknown role {role!r}")
        return RoleRule(role, init, std, lr_mult, eta * lr_mult, wd, eps)

    def table(self) -> list[RoleRule]:
        return [self.rule(r) for r in Role]

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_name(param: str, alpha: float | None) -> tuple[str, float]:
    """Map a user's `--param` (and optional `--alpha`) to (name, α). Aliases: depth-mup, completep."""
    key = param.strip().lower()
    if key in ALIASES:
        name, preset = ALIASES[key]
        if alpha is not None and alpha != preset:
            raise ConfigError(f"--param {param} fixes alpha={preset:g}; got --alpha {alpha:g}")
        return name, preset
    if key not in PARAMETERIZATIONS:
        allowed = ", ".join(PARAMETERIZATIONS + tuple(ALIASES))
        raise ConfigError(f"unknown parameterization {param!r}; allowed: {allowed}")
    return key, 1.0 if alpha is None else float(alpha)


def validate(p: Parameterization) -> None:
    """Raise ConfigError naming the offending value and what is allowed."""
    if p.name not in PARAMETERIZATIONS:
        raise ConfigError(f"unknown parameterization {p.name!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
    if not (isinstance(p.alpha, int | float) and 0.5 <= p.alpha <= 1.0):
        raise ConfigError(f"alpha={p.alpha!r} is outside the allowed range [0.5, 1]")
    for field in ("width", "depth", "base_width", "base_depth", "d_head"):
        value = getattr(p, field)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}={value!r} must be a positive integer")
    if p.width % p.d_head:
        raise ConfigError(f"width={p.width} is not a multiple of the head size {p.d_head}")
    for field in ("sigma_base", "lr_base"):
        value = getattr(p, field)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{field}={value!r} must be a positive finite number")
    if not (p.wd_base >= 0 and math.isfinite(p.wd_base)):
        raise ConfigError(f"wd_base={p.wd_base!r} must be a non-negative finite number")
    if not (p.eps_base > 0 and math.isfinite(p.eps_base)):
        raise ConfigError(f"eps_base={p.eps_base!r} must be a positive finite number")
    for field, allowed in (("eps_scope", EPS_SCOPES), ("mup_variant", MUP_VARIANTS), ("attn_scale", ATTN_SCALES)):
        if getattr(p, field) not in allowed:
            raise ConfigError(f"{field}={getattr(p, field)!r} is not one of {', '.join(allowed)}")
    if not isinstance(p.ablate, str):
        raise ConfigError(f"ablate={p.ablate!r} must be a comma-separated string of {', '.join(ABLATIONS)}")
    for name in p.ablations:
        if name not in ABLATIONS:
            raise ConfigError(f"ablate {name!r} is not one of {', '.join(ABLATIONS)}")

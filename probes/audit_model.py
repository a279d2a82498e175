"""Audit any model and its optimizer against Table 1 (+ Eq. 40): `audit(model, optimizer, ...)`.

`diagnose audit` checks the toolkit's own GPT, built from the table. This checks a model and optimizer
someone else built (a Hugging Face Llama with hand-made param groups, say): each parameter's role comes
from its adapter (`parameter_roles`), the prescription from `trainer.parameterization` (the one table),
and the audit compares, parameter by parameter,
- the optimizer's learning rate, weight decay and Adam ε of the group that holds it, and
- the measured init std (normal roles) or constant init (norm gains 1, biases 0), when `check_init`,
with the table at the model's shape (m_N = width / base_width, m_L = depth / base_depth), and lists every
mismatch with the parameter names. It is the check that catches an ε left global, a missing depth LR
factor or a width-blind init.

Adam ε follows Eq. 40 of the paper: ε_base/m_N for the embedding, unembedding and final norm (SP:
ε_base), and ε_base·m_N^(−1)·m_L^(−α) for block parameters (Table 1's block rule).

Base values not given (η_base, λ_base, ε_base, σ_base) are read off the token embedding, whose
prescription is the base value itself in every parameterization (LR η_base, WD λ_base, ε_base/m_N, std
σ_base); the report says which were inferred.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from probes.adapters import ModelAdapter, adapter_for
from trainer.parameterization import Parameterization, Role, resolve_name

QUANTITIES = ("lr", "weight_decay", "eps")


@dataclass
class Mismatch:
    """One departure from the table: a quantity of a role, with the parameters that have it."""

    role: str
    quantity: str  # lr | weight_decay | eps | init_std | init
    expected: float
    actual: float
    names: list[str]

    def line(self) -> str:
        shown = ", ".join(self.names[:4]) + (f" (+{len(self.names) - 4} more)" if len(self.names) > 4 else "")
        if self.quantity == "init":
            return f"{self.role}: init is not the constant {self.expected:g} (gains 1, biases 0): {shown}"
        return f"{self.role}: {self.quantity} {self.actual:.4g}, Table 1 says {self.expected:.4g}: {shown}"


@dataclass
class ModelAudit:
    parameterization: Parameterization
    inferred: list[str]  # base values read off the embedding
    rows: list[dict]  # per role: tensors, params, expected lr / weight_decay / eps / init
    mismatches: list[Mismatch] = field(default_factory=list)
    unaudited: list[str] = field(default_factory=list)  # parameters with no Table 1 role

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def lines(self) -> list[str]:
        p = self.parameterization
        out = [f"{p.label}  N={p.width} (m_N={p.m_n:g})  L={p.depth} (m_L={p.m_l:g})  η_base={p.lr_base:.4g} "
               f"λ_base={p.wd_base:.4g} ε_base={p.eps_base:.4g} σ_base={p.sigma_base:.4g}"
               + (f"  (inferred from the embedding: {', '.join(self.inferred)})" if self.inferred else "")]
        out.append(f"{'role':<19}{'tensors':>8}{'lr':>11}{'wd':>9}{'eps':>10}{'init':>7}{'std':>10}")
        for r in self.rows:
            out.append(f"{r['role']:<19}{r['tensors']:>8}{r['lr']:>11.4g}{r['weight_decay']:>9.3g}{r['eps']:>10.3g}"
                       f"{r['init']:>7}{r['init_std']:>10.4g}")
        out += ["MISMATCH " + m.line() for m in self.mismatches]
        if self.unaudited:
            out.append(f"not audited (no Table 1 role): {', '.join(self.unaudited)}")
        out.append("all ok" if self.ok else f"{len(self.mismatches)} mismatch(es) with Table 1")
        return out


def expected_eps(p: Parameterization, role: Role) -> float:
    """Adam ε by Eq. 40: block roles as Table 1; embedding, unembedding, final norm ε_base/m_N (SP: ε_base)."""
    if role.in_block or p.eps_scope == "all":
        return p.rule(role).eps
    return p.eps_base if p.name == "sp" else p.eps_base / p.m_n


def _groups_by_parameter(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Parameter name → its optimizer group; a clear error if the groups do not cover the model once."""
    names = {id(p): n for n, p in model.named_parameters()}
    where: dict[str, list[dict]] = defaultdict(list)
    strangers = 0
    for g in groups:
        for p in g["params"]:
            if id(p) in names:
                where[names[id(p)]].append(g)
            else:
                strangers += 1
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in where]
    twice = [n for n, gs in where.items() if len(gs) > 1]
    if missing or twice or strangers:
        problems = ([f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                   ([f"in two groups {twice[:5]}"] if twice else []) + \
                   ([f"{strangers} tensors not in the model"] if strangers else [])
        raise ValueError(f"optimizer groups do not cover the model exactly once: {'; '.join(problems)}")
    return {n: gs[0] for n, gs in where.items()}


def _peak_lr(group: dict) -> float:
    # The schedule multiplies the group LR; audit the peak when the group records it.
    return float(group.get("lr_peak", group.get("initial_lr", group["lr"])))


def _std(tensors: list[torch.Tensor]) -> float:
    n = sum(t.numel() for t in tensors)
    s1 = sum(t.detach().double().sum().item() for t in tensors)
    s2 = sum(t.detach().double().pow(2).sum().item() for t in tensors)
    return math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))


def _std_tolerance(n: int) -> float:
    # The sample std of n Gaussian draws has relative s.e. ≈ 1/sqrt(2n); allow 6 s.e. plus 1%.
    return 0.01 + 6.0 / math.sqrt(2.0 * max(n, 1))


@torch.no_grad()
def audit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[dict],
    parameterization: str = "completep",
    base_width: int = 256,
    base_depth: int = 2,
    alpha: float | None = None,
    *,
    lr_base: float | None = None,
    wd_base: float | None = None,
    eps_base: float | None = None,
    sigma_base: float | None = None,
    check_init: bool = True,
    adapter: ModelAdapter | None = None,
    rel_tol: float = 1e-6,
) -> ModelAudit:
    """Compare `optimizer`'s groups (and, with `check_init`, the weights as initialized) with Table 1.

    `parameterization`: sp | mup | alpha | completep | depth-mup (with `alpha` for "alpha"); the shape
    is the model's (width: the embedding's size, depth: the adapter's blocks). `optimizer` may be an
    optimizer or its list of param groups (each with "params", "lr", "weight_decay", "eps").
    Raises ValueError when the groups do not cover the model's parameters exactly once.
    """
    adapter = adapter or adapter_for(model)
    groups = optimizer.param_groups if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    group_of = _groups_by_parameter(model, groups)
    named = dict(model.named_parameters())
    roles = adapter.parameter_roles()
    embeddings = [n for n, r in roles.items() if r == "embedding"]
    if not embeddings:
        raise ValueError("the model has no parameter with role 'embedding': its width and base values are unknown")
    width = int(named[embeddings[0]].shape[-1])
    name, a = resolve_name(parameterization, alpha)
    shape = Parameterization(name=name, alpha=a, width=width, depth=adapter.depth, base_width=base_width,
                             base_depth=base_depth)
    embed_group = group_of[embeddings[0]]
    inferred = []
    if lr_base is None:
        lr_base, inferred = _peak_lr(embed_group), inferred + ["η_base"]
    if wd_base is None:
        wd_base, inferred = float(embed_group.get("weight_decay", 0.0)), inferred + ["λ_base"]
    if eps_base is None:  # Eq. 40: the embedding's ε is ε_base/m_N (SP: ε_base)
        eps = float(embed_group.get("eps", 0.0))
        eps_base, inferred = (eps if name == "sp" else eps * shape.m_n), inferred + ["ε_base"]
    if sigma_base is None:
        sigma_base, inferred = _std([named[n] for n in embeddings]), inferred + ["σ_base"]
    p = Parameterization(name=name, alpha=a, width=width, depth=adapter.depth, base_width=base_width,
                         base_depth=base_depth, lr_base=lr_base, wd_base=wd_base, eps_base=eps_base,
                         sigma_base=sigma_base)
    result = ModelAudit(p, inferred, rows=[], unaudited=sorted(n for n, r in roles.items() if r not in
                                                              {x.value for x in Role}))
    for role in Role:
        members = [n for n, r in roles.items() if r == role.value and n in group_of]  # frozen ones: no group
        if not members:
            continue
        rule = p.rule(role)
        expected = {"lr": rule.lr, "weight_decay": rule.weight_decay, "eps": expected_eps(p, role)}
        result.rows.append({"role": role.value, "tensors": len(members), **expected, "init": rule.init,
                            "init_std": rule.init_std})
        for quantity in QUANTITIES:
            off: dict[float, list[str]] = defaultdict(list)
            for n in members:
                g = group_of[n]
                actual = _peak_lr(g) if quantity == "lr" else float(g.get(quantity, 0.0))
                if not math.isclose(actual, expected[quantity], rel_tol=rel_tol, abs_tol=0.0):
                    off[actual].append(n)
            result.mismatches += [Mismatch(role.value, quantity, expected[quantity], v, ns) for v, ns in off.items()]
        if check_init:
            result.mismatches += _init_mismatches(role.value, rule.init, rule.init_std, members, named)
    return result


def _init_mismatches(role: str, init: str, std: float, members: list[str], named: dict) -> list[Mismatch]:
    if init == "normal":
        # Per tensor: a matrix drawn with the wrong std is named even when the role's other tensors are right.
        wrong = {n: _std([named[n]]) for n in members
                 if abs(_std([named[n]]) / std - 1) > _std_tolerance(named[n].numel())}
        if not wrong:
            return []
        return [Mismatch(role, "init_std", std, _std([named[n] for n in wrong]), sorted(wrong))]
    # Constant init: norm gains at 1, biases (norm biases included) at 0. Names ending in "bias" are biases.
    wrong = [n for n in members
             if not torch.all(named[n] == (0.0 if init == "zeros" or n.endswith("bias") else 1.0))]
    return [Mismatch(role, "init", 1.0 if init == "ones" else 0.0, math.nan, wrong)] if wrong else []


def role_summary(model: nn.Module, roles: dict[str, str]) -> list[str]:
    """One line per role: tensors, parameters and the first few names (tied weights counted once)."""
    named = dict(model.named_parameters())
    lines = [f"{'role':<19}{'tensors':>8}{'params':>12}  names"]
    for role in [r.value for r in Role] + ["other"]:
        members = [n for n, r in roles.items() if r == role]
        if members:
            count = sum(named[n].numel() for n in members)
            shown = ", ".join(members[:3]) + (f", ... (+{len(members) - 3})" if len(members) > 3 else "")
            lines.append(f"{role:<19}{len(members):>8}{count:>12,}  {shown}")
    return lines

"""`diagnose audit`: Table 1 as prescribed, next to what the built model and optimizer actually have.

The expected values come from `Parameterization.rule`; the measured ones from a freshly built model
(std of each role's initialized tensors, constant-init values) and its AdamW groups. Because the model
and the optimizer read the same table, a mismatch means a bug in how they read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.model import GPT, ModelConfig
from trainer.optim import build_optimizer
from trainer.parameterization import Parameterization, Role


@dataclass
class AuditRow:
    role: str
    tensors: int
    params: int
    init: str
    init_std: float
    measured_init_std: float
    lr: float
    measured_lr: float
    weight_decay: float
    measured_weight_decay: float
    eps: float
    measured_eps: float
    ok: bool
    problem: str = ""


def _std_tolerance(n: int) -> float:
    # The sample std of n Gaussian draws has relative s.e. ≈ 1/sqrt(2n); allow 6 s.e. plus 1%.
    return 0.01 + 6.0 / math.sqrt(2.0 * max(n, 1))


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


@torch.no_grad()
def audit(param: Parameterization, model_config: ModelConfig | None = None, seed: int = 0) -> dict:
    """Build the model and optimizer for `param` and compare them to the table.

    Returns {"rows": [AuditRow as dict], "branch_multiplier", "output_multiplier", "attention_scale"
    (expected and measured), "ok"}.
    """
    torch.manual_seed(seed)
    model = GPT(param, model_config)
    roles = model.parameter_roles()
    optimizer = build_optimizer(model, param, roles)
    groups = {g["name"]: g for g in optimizer.param_groups}
    named = dict(model.named_parameters())
    norm_biases = model.norm_bias_names()
    rows = []
    for role in Role:
        tensors = [named[n] for n, r in roles.items() if r is role]
        if not tensors:
            continue
        rule = param.rule(role)
        # Moments tensor by tensor in float64 (a concatenated copy of a 1024×64 model is 6 GB).
        count = sum(t.numel() for t in tensors)
        group = groups[role.value]
        problems = []
        if rule.init == "normal":
            s1 = sum(t.double().sum().item() for t in tensors)
            s2 = sum(t.double().pow(2).sum().item() for t in tensors)
            measured = math.sqrt(max(s2 / count - (s1 / count) ** 2, 0.0))
            if abs(measured / rule.init_std - 1) > _std_tolerance(count):
                problems.append(f"init std {measured:.4g} vs {rule.init_std:.4g}")
        else:
            # Constant init: LayerNorm gains at 1, every bias (LayerNorm biases included) at 0.
            names = [n for n, r in roles.items() if r is role]
            targets = [0.0 if (rule.init == "zeros" or n in norm_biases) else 1.0 for n in names]
            measured = max((named[n] - v).abs().max().item() for n, v in zip(names, targets))
            if measured != 0.0:
                problems.append(f"init not all {rule.init} (gains) / zeros (biases)")
        for what, expected, actual in (("lr", rule.lr, group["lr_peak"]), ("wd", rule.weight_decay,
                                       group["weight_decay"]), ("eps", rule.eps, group["eps"])):
            if not _close(expected, actual):
                problems.append(f"{what} {actual:.4g} vs {expected:.4g}")
        rows.append(AuditRow(role.value, len(tensors), count, rule.init, rule.init_std, measured,
                             rule.lr, group["lr_peak"], rule.weight_decay, group["weight_decay"], rule.eps,
                             group["eps"], not problems, "; ".join(problems)))
    multipliers = {
        "branch_multiplier": (param.branch_multiplier, [b.branch_multiplier for b in model.blocks]),
        "output_multiplier": (param.output_multiplier, [model.output_multiplier]),
        "attention_scale": (param.attention_scale, [b.attn_branch.attn.scale for b in model.blocks]),
    }
    out: dict = {"rows": [r.__dict__ for r in rows]}
    ok = all(r.ok for r in rows)
    for key, (expected, measured) in multipliers.items():
        match = all(_close(expected, m) for m in measured)
        ok &= match
        out[key] = expected
        out[f"measured_{key}"] = measured[0] if measured else expected
    out["ok"] = ok
    return out


def format_audit(param: Parameterization, result: dict) -> str:
    """A plain-text table for the terminal."""
    head = (f"{param.label}  N={param.width} (m_N={param.m_n:g})  L={param.depth} (m_L={param.m_l:g})  "
            f"η_base={param.lr_base:g} λ_base={param.wd_base:g} ε_base={param.eps_base:g} σ_base={param.sigma_base:g}")
    cols = f"{'role':<19}{'init':>7}{'std':>11}{'measured':>11}{'lr':>11}{'wd':>9}{'eps':>10}  check"
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        check = "ok" if r["ok"] else "MISMATCH: " + r["problem"]
        lines.append(f"{r['role']:<19}{r['init']:>7}{r['init_std']:>11.4g}{r['measured_init_std']:>11.4g}"
                     f"{r['measured_lr']:>11.4g}{r['measured_weight_decay']:>9.3g}{r['measured_eps']:>10.3g}  {check}")
    for key in ("branch_multiplier", "output_multiplier", "attention_scale"):
        ok = math.isclose(result[key], result[f"measured_{key}"], rel_tol=1e-9)
        lines.append(f"{key:<19} expected {result[key]:.6g}  model {result[f'measured_{key}']:.6g}  "
                     f"{'ok' if ok else 'MISMATCH'}")
    lines.append("all ok" if result["ok"] else "MISMATCH between the table and the built model")
    return "\n".join(lines)

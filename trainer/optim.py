"""AdamW parameter groups from the Table 1 rules, and the learning-rate schedule.

One group per role. Each group carries `lr_peak` (η_base × the role's LR multiplier); the schedule
multiplies it every step. The parameterization acts only through these groups and the model's
forward multipliers, so any AdamW implementation (foreach, fused) works unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.parameterization import Parameterization, Role

SCHEDULES = ("linear", "cosine", "constant")


def param_groups(model: nn.Module, param: Parameterization, roles: dict[str, Role]) -> list[dict]:
    """AdamW groups, one per role present, covering every parameter exactly once."""
    named = dict(model.named_parameters())
    check_coverage(named, roles)
    groups = []
    for role in Role:
        names = [n for n, r in roles.items() if r is role]
        if not names:
            continue
        rule = param.rule(role)
        groups.append(
            {
                "name": role.value,
                "params": [named[n] for n in names],
                "param_names": names,
                "lr": rule.lr,
                "lr_peak": rule.lr,
                "weight_decay": rule.weight_decay,
                "eps": rule.eps,
            }
        )
    return groups


def check_coverage(named: dict[str, nn.Parameter], roles: dict[str, Role]) -> None:
    """Every trainable parameter has exactly one role; name any that are missing or unknown."""
    missing = sorted(n for n, p in named.items() if p.requires_grad and n not in roles)
    unknown = sorted(n for n in roles if n not in named)
    if missing or unknown:
        raise AssertionError(f"parameter groups do not cover the model: missing={missing}, unknown={unknown}")


def build_optimizer(
    model: nn.Module,
    param: Parameterization,
    roles: dict[str, Role],
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    groups = param_groups(model, param, roles)
    seen = [id(p) for g in groups for p in g["params"]]
    dup = {n for g in groups for n, p in zip(g["param_names"], g["params"]) if seen.count(id(p)) > 1}
    if dup:
        raise AssertionError(f"parameters in more than one group: {sorted(dup)}")
    # param_names stays out of the optimizer's state_dict (strings are fine, but keep it lean).
    for g in groups:
        g.pop("param_names")
    # foreach (one call per group for all its tensors) unless fused: PyTorch picks it only for CUDA tensors,
    # but on CPU it also saves a Python loop per tensor, which shows at small widths; the same numbers bit
    # for bit (tests/trainer/test_optim_foreach.py).
    return torch.optim.AdamW(groups, lr=param.lr_base, betas=betas, fused=fused, foreach=None if fused else True)


def group_summary(optimizer: torch.optim.Optimizer) -> list[str]:
    """One line per group: role, tensors, params, lr, wd, eps."""
    lines = []
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(
            f"{g['name']:<19} tensors={len(g['params']):<4} params={n:<10,} "
            f"lr={g['lr_peak']:.4g} wd={g['weight_decay']:.4g} eps={g['eps']:.3g}"
        )
    return lines


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float = 0.0) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then decay to `min_factor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    # The last step keeps a small non-zero LR so that its update (and its probe) is not empty.
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_factor + (1.0 - min_factor) * shape


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["lr_peak"] * factor

"""Forward hooks in a `with` block: every handle is removed in `finally`, also when a probe raises."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SiteSpec:
    """Where a site's tensor is: the input (first positional arg) or output of a module.

    Tuple outputs (as Hugging Face blocks return) are read at index 0.
    """

    module: nn.Module
    where: str = "output"  # output | input


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    # A module's input is its first positional argument, or `hidden_states` when passed by keyword
    # (as Hugging Face decoder layers pass it to their attention modules).
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def capture(sites: Mapping[object, SiteSpec]) -> Iterator[dict[object, torch.Tensor]]:
    """Record the tensor at each site during the forward passes run inside the block.

    Yields a dict filled as the forward runs: key → tensor (still attached to the graph, so a caller
    may differentiate with respect to it). Handles are removed on exit, whatever happens inside.
    """
    store: dict[object, torch.Tensor] = {}
    handles = []
    try:
        for key, spec in sites.items():
            if spec.where == "input":
                def pre_hook(module, args, kwargs, key=key):
                    store[key] = _input_tensor(args, kwargs)

                handles.append(spec.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(module, args, output, key=key):
                    store[key] = _first_tensor(output)

                handles.append(spec.module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks and backward hooks left on any module of `model`."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total

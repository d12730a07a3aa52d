"""What the monitor reads from an optimizer: the torch optimizer inside a framework's wrapper, each parameter
group's (η, λ_wd) as used by an update, and which group holds each parameter."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["group_of_params", "group_rates", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, etc."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def group_rates(optimizer: Any) -> list[tuple[Any, Any]]:
    rates = []
    for group in optimizer.param_groups:
        lr = group.get("lr", 0.0)
        wd = group.get("weight_decay", 0.0) or 0.0
        rates.append((lr.detach() if isinstance(lr, torch.Tensor) else lr, wd))
    return rates


def group_of_params(optimizer: Any, params: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """Parameter name -> index of the optimizer group holding it (None: not optimised)."""
    if optimizer is None:
        return {}
    index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    return {name: index.get(id(param)) for name, param in params.items()}

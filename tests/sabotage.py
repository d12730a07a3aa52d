"""Shared by the HF and Lightning callback tests: a model whose Selection class has collapsed, and the rule that
catches it."""

from __future__ import annotations

import math

import torch

from weibull_monitor.alerts import SelectionCollapse


def sabotage_queries(model: torch.nn.Module, seed: int = 1) -> None:
    """Replace every W_q with Laplace draws of the same std: |w| exponential, k = 1, far below the Gaussian 1.2."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                exponential = -torch.rand(param.shape, generator=generator).clamp_min(1e-12).log()
                sign = torch.randint(0, 2, param.shape, generator=generator) * 2 - 1
                param.copy_(sign * exponential * (param.std() / math.sqrt(2)))


def collapse_rule() -> SelectionCollapse:
    """Critical as soon as one W_q sits below k 1.1 (Laplace: 1.0; Gaussian: 1.2), from step 5 on, whatever the
    attention kind and with no noise allowance (the built-in thresholds sit far lower, below healthy ranges)."""
    limits = dict.fromkeys(("deep", "mild", "transitional", None), (1.15, 1.1))
    return SelectionCollapse(thresholds=limits, z=0.0, warmup=5, patience=1)

"""The layout probe: learn from a model's own forward pass which weight elements feed the attention's Q, K and V (head
by head), which read the attention output, and which form the MLP (docs/roles.md).

Pipeline inside: ``trace`` (one forward pass under a torch function mode: every linear use of a weight, every
attention call) -> ``analysis`` (gradients with respect to zero leaves added to the projections' outputs: labels per
weight element) -> ``verify`` (the role map and the fused layouts checked against the labels) and ``learn`` (a
layout for a fused parameter no registered layout claims, from its labels).

The probe never changes a weight or a parameter flag, needs no network, and runs one short input (by default 8
token ids) in eval mode (restored afterwards); its gradients are taken with respect to the added leaves only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weibull_monitor.models.probe.analysis import BITS, Labels, analyse
from weibull_monitor.models.probe.trace import Tracer, traced

__all__ = ["BITS", "Labels", "Tracer", "default_inputs", "probe_model"]


def default_inputs(model: torch.nn.Module, length: int = 8) -> dict[str, torch.Tensor]:
    """One sequence of ``length`` token ids inside the model's vocabulary (``model.config.vocab_size``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", None) or 0)
    if vocab < 4:
        raise ValueError("the probe needs example inputs for a model without config.vocab_size")
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, vocab, (1, length), generator=generator)}


def probe_model(
    model: torch.nn.Module,
    inputs: Mapping[str, Any] | None = None,
    *,
    roles: Mapping[str, Any] | None = None,
) -> tuple[Labels, Tracer]:
    """Trace one forward pass of ``model`` on ``inputs`` (default :func:`default_inputs`) and label every weight
    matrix (the parameters named in ``roles``, else every 2-D and 3-D parameter)."""
    named = dict(model.named_parameters())
    names = list(roles) if roles is not None else [n for n, p in named.items() if p.dim() in (2, 3)]
    params = {n: named[n] for n in names if n in named}
    inputs = dict(inputs) if inputs is not None else default_inputs(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with traced(model, params) as tracer:
            model(**inputs)
        routers = frozenset(
            n for n, r in (roles or {}).items() if getattr(r, "component", None) in ("router", "indexer")
        )
        with torch.enable_grad():
            labels = analyse(tracer, routers)
    finally:
        for module, training in modes.items():
            module.training = training
    return labels, tracer

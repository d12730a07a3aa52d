"""Layouts learned at run time: for a fused parameter no verified layout claims, read its split off the probe's
labels (opt-in, :func:`learn_layouts`; docs/roles.md says what it costs).

Each output feature of the fused projection is matched to the one part whose labels it carries (a query feature
feeds Q only, a GLU gate feature enters the down projection non-linearly, ...). When the assignment repeats with a
period and each part holds one run of rows inside the period (concatenated blocks, per-head interleaving, grouped
queries), the learned split returns strided views like the built-in layouts; otherwise it gathers the rows (a copy
of the parameter at fit time). A parameter whose features do not all match a part is not learned: it stays whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from weibull_monitor.models.components import Role
from weibull_monitor.models.layouts import FusedLayout, LayoutQuery, find_layout, register_layout
from weibull_monitor.models.naming import strip
from weibull_monitor.models.probe import probe_model
from weibull_monitor.models.probe.analysis import LINEAR, MLP_IN, NONLINEAR, USED, K, Q, V
from weibull_monitor.models.roles import model_roles

__all__ = ["layout_from_labels", "learn_layouts"]

_QKV = Q | K | V
# part component -> (labels its features carry among Q, K, V, MLP_IN, and the GLU side or 0)
_PART_BITS = {
    "q": (Q, 0),
    "q_b": (Q, 0),
    "k": (K, 0),
    "k_rope": (K, 0),
    "v": (V, 0),
    "kv_latent": (K | V, 0),
    "attn_gate": (0, 0),
    "ffn_gate": (MLP_IN, NONLINEAR),
    "ffn_up": (MLP_IN, LINEAR),
}


def learn_layouts(
    model: torch.nn.Module, inputs: Mapping[str, Any] | None = None, *, register: bool = True
) -> dict[str, FusedLayout]:
    """Probe ``model`` once and learn a layout for every fused parameter no verified layout claims.

    Returns parameter name -> the learned :class:`FusedLayout` (registered ahead of the built-ins unless
    ``register=False``); parameters whose split the labels do not determine are absent. Cost: one forward pass of
    ``inputs`` (default 8 token ids) with gradients, and a few backward passes per attention call and MLP
    through the projections only, in eval mode; no weight or parameter flag changes."""
    config = getattr(model, "config", None)
    roles = model_roles(model)
    params = dict(model.named_parameters())
    fused = {
        name: role
        for name, role in roles.items()
        if role.parts and find_layout(name, tuple(params[name].shape), config, role=role) is None
    }
    if not fused:
        return {}
    labels, _ = probe_model(model, inputs, roles=roles)
    learned: dict[str, FusedLayout] = {}
    for name, role in fused.items():
        layout = layout_from_labels(name, role, labels.bits[name], config)
        if layout is not None:
            learned[name] = layout
            if register:
                register_layout(layout)
    return learned


def layout_from_labels(name: str, role: Role, bits: torch.Tensor, config: Any = None) -> FusedLayout | None:
    """The layout of one fused parameter from its labels, or None when they do not determine it."""
    inner = tuple(
        dict.fromkeys(p.split(".", 1)[1] if p.startswith("e") and "." in p else p for p in role.parts)
    )
    matrix = _observed_slice(bits) if role.stacked else bits
    if matrix is None:
        return None
    found = _feature_parts(matrix, inner)
    if found is None:
        return None
    axis, assignment = found
    split = _periodic_split(assignment, inner, axis) or _gathered_split(assignment, inner, axis)
    pattern = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in strip(name).split("."))
    shape = tuple(matrix.shape)
    family = getattr(config, "model_type", None) if config is not None else None

    def applies(query: LayoutQuery) -> bool:
        return bool(re.fullmatch(pattern, query.name)) and tuple(query.shape) == shape

    return FusedLayout(f"learned:{pattern}", applies, split, frozenset({family}))


def _observed_slice(bits: torch.Tensor) -> torch.Tensor | None:
    """One expert of a stack that the traced pass read (experts share a layout)."""
    for expert in range(bits.shape[0]):
        if ((bits[expert] & USED) != 0).all():
            return bits[expert]
    return None


def _feature_parts(bits: torch.Tensor, parts: tuple[str, ...]) -> tuple[int, list[str]] | None:
    """(feature axis, the part of each feature) when every feature matches exactly one part."""
    for axis in (0, 1):
        features = bits if axis == 0 else bits.T
        if not (features == features[:, :1]).all():
            continue  # the elements of one output feature must share their labels
        assignment = []
        for value in features[:, 0].tolist():
            if not value & USED:
                return None
            matches = [p for p in parts if _matches(value, *_PART_BITS.get(p, (-1, 0)))]
            if len(matches) != 1:
                return None
            assignment.append(matches[0])
        if set(assignment) == set(parts):
            return axis, assignment
    return None


def _matches(value: int, attention: int, side: int) -> bool:
    if attention < 0:
        return False
    if attention == 0:
        return not value & (_QKV | MLP_IN)
    if attention == MLP_IN:
        return bool(value & MLP_IN) and not value & _QKV and bool(value & side)
    return (value & _QKV) == attention


def _periodic_split(assignment: list[str], parts: tuple[str, ...], axis: int) -> Any:
    """A split by views when the assignment repeats with a period holding one run of each part."""
    n = len(assignment)
    for period in range(1, n + 1):
        if n % period or any(assignment[i] != assignment[i % period] for i in range(n)):
            continue
        runs: dict[str, tuple[int, int]] = {}
        for i, part in enumerate(assignment[:period]):
            start, end = runs.get(part, (i, i))
            if end != i and part in runs:
                break  # a part in two runs inside the period
            runs[part] = (start, i + 1)
        else:
            if set(runs) != set(parts):
                return None
            return _view_split(runs, parts, period, axis)
    return None


def _view_split(runs: dict[str, tuple[int, int]], parts: tuple[str, ...], period: int, axis: int) -> Any:
    def split(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
        rows = weight if axis == 0 else weight.T
        blocks = rows.unflatten(0, (rows.shape[0] // period, period))
        out = {}
        for part in parts:
            start, end = runs[part]
            view = blocks[:, start:end]
            out[part] = view.reshape(-1, rows.shape[1]) if as_matrix else view
        return out

    return split


def _gathered_split(assignment: list[str], parts: tuple[str, ...], axis: int) -> Any:
    index = {p: torch.tensor([i for i, a in enumerate(assignment) if a == p]) for p in parts}

    def split(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
        rows = weight if axis == 0 else weight.T
        return {part: rows.index_select(0, index[part].to(rows.device)) for part in parts}

    return split

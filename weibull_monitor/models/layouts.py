"""Fused layouts as a registry: how each family's fused parameter (QKV, gate-up, MLA, expert stacks) is cut into its
parts, exactly as that family's forward pass slices it (docs/roles.md).

A layout is a :class:`FusedLayout`: a test on a :class:`LayoutQuery` (the parameter's name, its role, the model type
and config), a split function, and the model types its split was verified on by the layout probe
(:mod:`weibull_monitor.models.probe`; ``families=None`` for layouts told by a name or shape no other family uses).
:func:`split_fused` takes the first registered layout whose test passes *for a verified family*; a new family is one
:func:`register_layout` call. A fused parameter that no layout claims is not split by a guess: it is reported whole,
with the reason. The built-in table is in :mod:`weibull_monitor.models.layout_table`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weibull_monitor.models.components import Role
from weibull_monitor.models.config import as_config, model_type
from weibull_monitor.models.naming import strip
from weibull_monitor.models.roles import classify

__all__ = ["FusedLayout", "LayoutQuery", "find_layout", "register_layout", "registered_layouts", "split_fused"]


@dataclass(frozen=True)
class LayoutQuery:
    """What a layout may look at: the parameter's name (``.weight`` and PEFT wrappers removed), the last segment of
    that name (lower case), its role, the model type (lower case, or None), the config (may be None) and the shape
    of the 2-D matrix being split."""

    name: str
    last: str
    role: Role
    model_type: str | None
    config: Any
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class FusedLayout:
    """One family's fused layout. ``applies(query)`` says whether it is this one; ``split(weight, query, as_matrix)``
    returns ``{part: view}`` in nn.Linear orientation [out, in], with exactly the parts of ``query.role.parts``
    (for a 2-D weight; expert stacks are split per expert by :func:`split_fused`). ``as_matrix=False`` allows
    strided views of another shape where a 2-D view is impossible (per-head interleaving)."""

    name: str
    applies: Callable[[LayoutQuery], bool]
    split: Callable[[torch.Tensor, LayoutQuery, bool], dict[str, torch.Tensor]]
    families: frozenset[str] | None = None  # model types the probe verified; None: told by name or shape alone

    def claims(self, query: LayoutQuery) -> bool:
        """Whether this layout splits ``query``: its test passes and the family is one it was verified on. A
        family's verification covers its language model only: a vision or audio tower of a multimodal model runs
        other code under the same parameter names and keeps its fused parameters whole."""
        if not self.applies(query):
            return False
        if self.families is None:
            return True
        return query.model_type in self.families and not TOWER.search(query.name)


#: Module paths of the vision and audio towers of multimodal models (text-only sweeps never run them).
TOWER = re.compile(
    r"(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder|image_encoder|img_processor|image_embed|audio_tower"
    r"|audio_model|audio_embed|audio_encoder|speech_encoder|embed_tokens_extend)(?:\.|$)"
)

_REGISTRY: list[FusedLayout] = []


def register_layout(layout: FusedLayout, *, first: bool = True) -> None:
    """Add a layout; ``first`` puts it ahead of every registered one (a user's layout wins over the built-ins).
    A layout registered again under the same name replaces the earlier one."""
    _REGISTRY[:] = [known for known in _REGISTRY if known.name != layout.name]
    if first:
        _REGISTRY.insert(0, layout)
    else:
        _REGISTRY.append(layout)


def registered_layouts() -> tuple[FusedLayout, ...]:
    """The layouts in the order :func:`split_fused` tries them."""
    return tuple(_REGISTRY)


def split_fused(
    name: str,
    weight: torch.Tensor,
    config: Any = None,
    *,
    role: Role | None = None,
    as_matrix: bool = True,
    layout: FusedLayout | None = None,
) -> dict[str, torch.Tensor]:
    """Split a fused or stacked parameter into its parts, laid out exactly as the architecture's forward pass slices it.

    Returns ``{component: tensor}`` in nn.Linear orientation [out, in]: ``q``/``k``/``v`` for fused attention,
    ``ffn_gate``/``ffn_up`` for fused gate-up, and ``e<i>.<component>`` for 3-D expert stacks. Contiguous block
    layouts give views sharing the parameter's storage. Per-head interleaved layouts (GPT-NeoX, BLOOM, Falcon,
    GPT-BigCode without MQA) cannot be a 2-D view: ``as_matrix=True`` returns 2-D copies, ``as_matrix=False``
    strided views shaped [heads, head_dim, in] (the same elements, no copy).

    ``role``: the parameter's role as the model's role map gave it (with the user's overrides); classified from
    the name when None. Raises ValueError when the parameter is not fused, when no layout verified for the model
    type claims it, or when the config lacks what the layout needs. ``layout`` forces one layout, verified for
    the family or not (the probe uses it to try candidates; fits never do).
    """
    config = as_config(config)
    role = role if role is not None else classify(name, weight.shape, config)
    if role is None or not role.parts:
        raise ValueError(f"{name!r} is not a fused or stacked parameter")
    stripped = strip(name)
    last = stripped.rsplit(".", 1)[-1].lower()
    query = LayoutQuery(stripped, last, role, model_type(config), config, tuple(weight.shape))
    if role.stacked:
        out: dict[str, torch.Tensor] = {}
        inner_role = Role(role.layer, role.component, role.klass, parts=tuple(_inner(role)))
        inner_query = LayoutQuery(stripped, last, inner_role, query.model_type, config, tuple(weight.shape[1:]))
        inner_layout = (layout or _find(inner_query)) if inner_role.parts != (role.component,) else None
        if inner_role.parts != (role.component,) and inner_layout is None:
            raise ValueError(_refusal(inner_query))
        for expert in range(weight.shape[0]):
            inner = (
                _split_2d(weight[expert], inner_query, as_matrix, inner_layout)
                if inner_layout is not None
                else {role.component: weight[expert]}
            )
            out.update({f"e{expert}.{k}": v for k, v in inner.items()})
        return out
    layout = layout or _find(query)
    if layout is None:
        raise ValueError(_refusal(query))
    return _split_2d(weight, query, as_matrix, layout)


def find_layout(
    name: str, shape: tuple[int, ...], config: Any = None, *, role: Role | None = None, candidates: bool = False
) -> FusedLayout | list[FusedLayout] | None:
    """The layout :func:`split_fused` would use for a parameter (for an expert stack: for each expert), or None;
    ``candidates=True``: every registered layout whose test passes, verified for the family or not."""
    config = as_config(config)
    role = role if role is not None else classify(name, shape, config)
    if role is None or not role.parts:
        return [] if candidates else None
    stripped = strip(name)
    last = stripped.rsplit(".", 1)[-1].lower()
    if role.stacked:
        role, shape = Role(role.layer, role.component, role.klass, parts=tuple(_inner(role))), tuple(shape[1:])
    query = LayoutQuery(stripped, last, role, model_type(config), config, tuple(shape))
    if candidates:
        return [layout for layout in _REGISTRY if layout.applies(query)]
    return _find(query)


def _families(families: frozenset[str | None]) -> str:
    named = sorted(f for f in families if f)
    return ", ".join(named) if len(named) <= 4 else f"{', '.join(named[:3])} and {len(named) - 3} more"


def _find(query: LayoutQuery) -> FusedLayout | None:
    return next((layout for layout in _REGISTRY if layout.claims(query)), None)


def _refusal(query: LayoutQuery) -> str:
    candidates = [layout for layout in _REGISTRY if layout.applies(query)]
    if candidates and TOWER.search(query.name):
        return (
            f"{query.name!r}: a vision or audio tower's fused parameter: no layout was verified on it (the families' "
            "verifications ran their language model); kept whole. Learn it with weibull_monitor.models.learn_layouts "
            "(model, inputs) from inputs that run the tower, or register one"
        )
    if candidates:
        known = "; ".join(
            f"{layout.name} on {_families(layout.families)}" for layout in candidates if layout.families
        )
        return (
            f"{query.name!r}: no layout verified for model type {query.model_type!r} ({known or 'no candidate'}); "
            "kept whole. Learn it from the model's own forward pass with "
            "weibull_monitor.models.learn_layouts(model), or register one"
        )
    return (
        f"{query.name!r}: no split layout known for this fused parameter (register one with "
        "weibull_monitor.models.register_layout, or learn it with weibull_monitor.models.learn_layouts)"
    )


def _inner(role: Role) -> list[str]:
    """The per-expert parts of an expert stack (``e3.ffn_gate`` -> ``ffn_gate``), in order, once each."""
    seen: list[str] = []
    for part in role.parts:
        inner = part.split(".", 1)[1] if "." in part else part
        if inner not in seen:
            seen.append(inner)
    return seen


def _split_2d(
    weight: torch.Tensor, query: LayoutQuery, as_matrix: bool, layout: FusedLayout
) -> dict[str, torch.Tensor]:
    if weight.ndim != 2:
        raise ValueError(f"{query.name!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    parts = layout.split(weight, query, as_matrix)
    if tuple(parts) != tuple(query.role.parts):
        raise ValueError(
            f"{query.name!r}: layout {layout.name!r} gave parts {tuple(parts)}, the role expects {query.role.parts}"
        )
    return parts



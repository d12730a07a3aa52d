"""Which matrices count in a class's aggregates: the one definition the dynamics, the alert rules and the scan share.

Classes (docs/roles.md): selection (W_q, W_k), transmission (W_o, FFN), value (W_v), mixed (fused projections
that hold several of them), other (embeddings, heads, routers, unrecognised). A fused parent whose parts were split
off counts through its parts, not itself, so each weight element counts once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CLASSES", "class_members", "members_of"]

#: Classes aggregated on dashboards, in display order (a class without members is simply absent).
CLASSES = ("selection", "transmission", "value", "mixed", "other")


def class_members(
    fits: Mapping[str, Any], roles: Mapping[str, Any], stats: Mapping[str, Any]
) -> dict[str, list[str]]:
    """klass -> keys of the ok fits that count in that class's aggregates (``stats[key].in_aggregates`` false:
    left out; a key without stats counts)."""
    members: dict[str, list[str]] = {}
    for key, fit in fits.items():
        role, s = roles.get(key), stats.get(key)
        if role is None or not fit.ok or (s is not None and not s.in_aggregates):
            continue
        members.setdefault(role.klass, []).append(key)
    return members


def members_of(snapshot: Any, klass: str) -> list[str]:
    """The keys of a snapshot's ok fits that count in ``klass``'s aggregates."""
    stats = getattr(snapshot, "matrices", None) or {}
    return class_members(snapshot.fits, snapshot.roles, stats).get(klass, [])

"""The vocabulary of the role map: components, the paper's classes, and :class:`Role` (docs/roles.md).

Classes: Selection (W_q, W_k), Transmission (W_o and the FFN), Value (W_v); a fused projection that holds several
of them is ``mixed``; embeddings, heads, routers and unrecognised matrices are ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["COMPONENTS", "KLASS_OF_COMPONENT", "Role", "split_key", "view_role"]

COMPONENTS = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "ffn_up",
    "ffn_gate",
    "ffn_down",
    "ffn_gate_up",
    "embed",
    "lm_head",
    "router",
    "other",
)

KLASS_OF_COMPONENT = {
    "q": "selection",
    "k": "selection",
    "v": "value",
    "o": "transmission",
    "qkv": "mixed",
    "ffn_up": "transmission",
    "ffn_gate": "transmission",
    "ffn_down": "transmission",
    "ffn_gate_up": "transmission",
    "embed": "other",
    "lm_head": "other",
    "router": "other",
    "other": "other",
}


@dataclass(frozen=True)
class Role:
    """What one weight matrix (or one split view of a fused parameter) is.

    ``parts`` lists the keys :func:`split_fused` returns for this parameter (empty when it is not fused);
    ``stacked`` is True for a 3-D expert stack (``experts.gate_up_proj`` of shape [experts, out, in]), which is
    not one matrix: fit its parts only. A fused 2-D parameter (``qkv``) is one matrix and is fitted whole too.
    """

    layer: int | None
    component: str
    klass: str
    expert: int | None = None
    stack: str | None = None
    fused_parent: str | None = None
    parts: tuple[str, ...] = ()
    stacked: bool = False


def split_key(name: str, component: str) -> str:
    """The key a split view is reported under: ``"<name>[<component>]"``, e.g. ``"...query_key_value.weight[q]"``."""
    return f"{name}[{component}]"


def view_role(parent_name: str, parent_role: Role, component: str) -> Role:
    """The role of one split view of a fused or stacked parameter (``component`` as in ``parent_role.parts``)."""
    expert = parent_role.expert
    inner = component
    found = re.fullmatch(r"e(\d+)\.(.+)", component)
    if found:
        expert, inner = int(found.group(1)), found.group(2)
    if inner not in COMPONENTS:
        raise ValueError(f"{component!r} is not a split component of {parent_name!r}")
    return Role(
        layer=parent_role.layer,
        component=inner,
        klass=KLASS_OF_COMPONENT[inner],
        expert=expert,
        stack=parent_role.stack,
        fused_parent=parent_name,
    )

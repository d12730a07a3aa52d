"""The vocabulary of the role map: components, the paper's classes, and :class:`Role` (docs/roles.md).

Classes: Selection (W_q, W_k), Transmission (W_o and the FFN), Value (W_v); a fused projection that holds several
of them is ``mixed``; the projections of linear-attention, state-space and recurrent mixers are ``recurrent`` (never
pooled with the paper's classes); embeddings, heads, routers, indexers and unrecognised matrices are ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["COMPONENTS", "KLASS_OF_COMPONENT", "RECURRENT_COMPONENTS", "Role", "split_key", "view_role"]

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
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-lite, LongCat): query down/up projections,
    # the KV down projection (a latent that feeds K and V, plus the shared rope key) and the KV up projection
    "q_a",
    "q_b",
    "kv_a",
    "kv_latent",
    "k_rope",
    "kv_b",
    # other fused or shared attention projections
    "kv",  # K and V stored as one matrix (JetMoE kv_proj): split into k, v
    "kv_shared",  # one projection whose every row feeds both K and V (DeepSeek-V4 kv_proj, K == V)
    "q_gate",  # query and attention-output gate stored as one matrix (Qwen3-Next q_proj): split into q, attn_gate
    "attn_gate",  # a gate multiplied into the attention output (Qwen3-Next, AFMoE, Laguna, LFM3)
    # linear attention, state-space and recurrent mixers (class "recurrent")
    "rec_q",
    "rec_k",
    "rec_v",
    "rec_in",
    "rec_gate",
    "rec_state",
    "rec_out",
    "embed",
    "lm_head",
    "router",
    "indexer",  # a token selector (DeepSeek-V3.2 lightning indexer): routes tokens as a router routes experts
    "aux",  # a recognised block matrix that is no attention, MLP or mixer projection (per-layer embeddings, ...)
    "other",
)

#: The components of the recurrent class: projections of linear-attention, SSM and recurrent token mixers.
RECURRENT_COMPONENTS = ("rec_q", "rec_k", "rec_v", "rec_in", "rec_gate", "rec_state", "rec_out")

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
    "q_a": "selection",
    "q_b": "selection",
    "kv_a": "mixed",
    "kv_latent": "mixed",
    "k_rope": "selection",
    "kv_b": "mixed",
    "kv": "mixed",
    "kv_shared": "mixed",
    "q_gate": "mixed",
    "attn_gate": "transmission",
    **{c: "recurrent" for c in RECURRENT_COMPONENTS},
    "embed": "other",
    "lm_head": "other",
    "router": "other",
    "indexer": "other",
    "aux": "other",
    "other": "other",
}


@dataclass(frozen=True)
class Role:
    """What one weight matrix (or one split view of a fused parameter) is.

    ``parts`` lists the keys :func:`split_fused` returns for this parameter (empty when it is not fused);
    ``qualifier`` tells apart matrices that share a component in one layer (``position`` embeddings, the
    ``shared`` expert, the ``a``/``b`` halves of a factored output): it is part of the stable metric key.
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
    qualifier: str | None = None  # tells apart roles that share a component in one layer (docs/roles.md keys)


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
        qualifier=parent_role.qualifier,
    )

"""Naming rules as data: a regex on a parameter's module path -> component, first match wins (docs/roles.md).

A new family is a line in ``NAME_RULES``, not a new branch; users add their own with ``overrides``
(regex -> component, searched in the full name, ahead of the built-in rules).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from weibull_monitor.models.components import COMPONENTS

__all__ = ["NAME_RULES", "compile_overrides", "match_rules", "strip"]


# Naming rules. Each regex is searched in the parameter name with its trailing ".weight" removed; first match wins.
# Context words (attention vs mlp) disambiguate names that several families reuse (c_proj, dense, wo, output.dense).
_ATTN = r"(?:attn|attention|self_attn|self_attention|selfattention|encdecattention|crossattention|encoder_attn|cross_attn)"
_MLP = (
    r"(?:mlp|ffn|feed_forward|feedforward|densereludense|ff|block_sparse_moe|moe|shared_expert|experts\.\d+)"
)

NAME_RULES: tuple[tuple[str, str], ...] = (
    # fused attention projections
    (r"(?:^|\.)(?:query_key_value|qkv_proj|wqkv|att_proj|w_pack|qkv)$", "qkv"),
    (r"(?:^|\.)in_proj_weight$", "qkv"),  # torch.nn.MultiheadAttention
    (r"(?:^|\.)c_attn$", "qkv"),  # GPT-2 (Conv1D), GPT-BigCode, Qwen-1
    (r"(?:^|\.)q_attn$", "q"),  # GPT-2 cross-attention query
    # separate attention projections
    (r"(?:^|\.)(?:q_proj|query|query_proj|wq|q_lin|q_proj_weight)$", "q"),
    (r"(?:^|\.)(?:k_proj|key|key_proj|wk|k_lin|k_proj_weight)$", "k"),
    (r"(?:^|\.)(?:v_proj|value|value_proj|wv|v_lin|v_proj_weight)$", "v"),
    (_ATTN + r"\.(?:q)$", "q"),  # T5
    (_ATTN + r"\.(?:k)$", "k"),
    (_ATTN + r"\.(?:v)$", "v"),
    (_ATTN + r"\.(?:o|o_proj|out_proj|dense|c_proj|wo|out_lin|proj)$", "o"),
    (r"attention\.output\.dense$", "o"),  # BERT, RoBERTa, DeBERTa, ViT (old names)
    (r"(?:^|\.)(?:o_proj|out_proj|attn_out|out_lin)$", "o"),  # out_lin: DistilBERT; attn_out: OLMo-1
    # routers (before the FFN rules: "mlp.gate" is the Mixtral/Qwen-MoE router, "gate_proj" is the FFN gate)
    (r"(?:^|\.)(?:router|shared_expert_gate)(?:\.layer|\.classifier)?$", "router"),
    (r"(?:mlp|block_sparse_moe|moe)\.gate$", "router"),
    # FFN
    # ff_proj: OLMo-1, stored up first and gate second (see split_fused)
    (r"(?:^|\.)(?:gate_up_proj|ff_proj|w13|fc1_gate_up)$", "ffn_gate_up"),
    (r"(?:^|\.)(?:gate_proj|w1|wi_0|gate_linear)$", "ffn_gate"),
    (r"(?:^|\.)(?:up_proj|w3|wi_1|wi|fc_in|c_fc|dense_h_to_4h|fc1|linear1|lin1|up_linear)$", "ffn_up"),
    (r"intermediate\.dense$", "ffn_up"),
    (r"(?:^|\.)(?:down_proj|w2|fc_out|dense_4h_to_h|fc2|linear2|lin2|down_linear)$", "ffn_down"),
    (_MLP + r"\.(?:wo|c_proj|dense|out)$", "ffn_down"),
    # BERT family: layer.N.output.dense is the FFN's down projection (attention.output.dense matched above)
    (r"(?:layer|layers|h|blocks|block)\.\d+\.output\.dense$", "ffn_down"),
    (r"(?:layer|layers|h|blocks|block)\.\d+\.ff_out$", "ffn_down"),  # OLMo-1 block ff_out
    # embeddings and heads
    (
        r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_in"
        r"|shared|embed_positions|rel_embeddings|relative_attention_bias|tok_embeddings|embeddings)$",
        "embed",
    ),
    (r"(?:^|\.)(?:lm_head|embed_out|output)$", "lm_head"),
    (r"(?:^|\.)(?:lm_head|predictions)\.decoder$", "lm_head"),
    (r"(?:^|\.)transformer\.ff_out$", "lm_head"),  # OLMo-1 untied output head
    # recognised heads that are no transformer projection: classed "other" without a warning
    (
        r"(?:^|\.)(?:classifier|score|qa_outputs|pooler\.dense|transform\.dense|lm_head\.dense|summary|pre_classifier"
        r"|classifier\.dense|classifier\.out_proj|seq_relationship|vocab_transform)$",
        "other",
    ),
    (r"\.lora_(?:embedding_)?[ab](?:\.[^.]+)?$", "other"),  # PEFT adapters: low-rank factors, not projections
)
_COMPILED_RULES = tuple((re.compile(pattern, re.IGNORECASE), component) for pattern, component in NAME_RULES)

NON_MATRIX = re.compile(
    r"(?:\.bias$|_bias$|(?:^|\.|_)(?:ln|norm|layernorm|layer_norm|ln_\d|ln_f|rmsnorm)(?:\.|_|\d|$)|norm\.weight$"
    r"|(?:^|\.)(?:cls_token|mask_token)$)",
    re.IGNORECASE,
)
EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
EXPERT_STACK = re.compile(r"(?:^|\.)experts\.(?:gate_up_proj|down_proj|up_proj|gate_proj|w1|w2|w3)$")
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
CROSS = re.compile(r"(?:encdecattention|crossattention|encoder_attn|cross_attn|enc_dec_attn)", re.IGNORECASE)
STACK_SEGMENT = re.compile(r"(?:^|\.)(encoder|decoder)(?:\.|$)")
T5_STACK = re.compile(r"(?:^|\.)(?:encoder|decoder)\.block\.\d+")


def strip(name: str) -> str:
    """The module path a rule sees: no trailing ``.weight``, no PEFT ``.base_layer`` wrapper."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.replace(".base_layer", "")


def match_rules(name: str, overrides: Iterable[tuple[re.Pattern[str], str]] = ()) -> tuple[str, bool]:
    """(component, recognised) for a parameter name; overrides are searched in the full name first."""
    for pattern, component in overrides:
        if pattern.search(name):
            return component, True
    stripped = strip(name)
    for pattern, component in _COMPILED_RULES:
        if pattern.search(stripped):
            return component, True
    return "other", False


def compile_overrides(
    overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> list[tuple[Any, str]]:
    if overrides is None:
        return []
    pairs = overrides.items() if isinstance(overrides, Mapping) else overrides
    compiled = []
    for pattern, component in pairs:
        if component not in COMPONENTS:
            raise ValueError(f"override {pattern!r} maps to {component!r}, which is not one of {COMPONENTS}")
        try:
            compiled.append((re.compile(pattern), component))
        except re.error as err:
            raise ValueError(
                f"override pattern {pattern!r} is not a valid regular expression: {err}"
            ) from err
    return compiled

"""Naming rules as data: a regex on a parameter's module path -> component (and a qualifier), first match wins
(docs/roles.md).

A new family is a line in ``NAME_RULES`` (or in ``FAMILY_RULES`` when a name means different things in different
families), not a new branch; users add their own with ``overrides`` (regex -> component, searched in the full
name, ahead of the built-in rules). Layers whose token mixer is no softmax attention (``layer_types`` of hybrid
configs) turn attention components into recurrent ones (:func:`recurrent_layers`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from weibull_monitor.models.components import COMPONENTS
from weibull_monitor.models.config import config_value

__all__ = [
    "FAMILY_RULES",
    "NAME_RULES",
    "WRAPPER_PREFIXES",
    "compile_overrides",
    "display_name",
    "match_rules",
    "recurrent_layers",
    "strip",
]


# Context words (attention vs mlp vs recurrent mixer) disambiguate names that several families reuse.
_ATTN = (
    r"(?:attn|attention|self_attn|self_attention|selfattention|encdecattention|crossattention|encoder_attn"
    r"|cross_attn|self_att|shared_transf\.self_attn)"
)
_MLP = (
    r"(?:mlp|ffn|feed_forward|feedforward|densereludense|ff|block_sparse_moe|moe|shared_expert|shared_experts"
    r"|experts\.\d+|shared_mlp)"
)
# token mixers that are no softmax attention: Mamba/SSM, linear attention, short convolutions, RG-LRU, mLSTM, RWKV
_REC = (
    r"(?:mamba|linear_attn|mlstm_layer|temporal_block(?=\.(?:linear_x|linear_y|linear_out)$)|conv|time_mix|rg_lru"
    r"|rwkv\.blocks\.\d+\.attention"
    r"|backbone\.layers\.\d+\.mixer|mixer(?=\.(?:in_proj|x_proj|dt_proj|out_proj)$))"
)

Rule = tuple  # (pattern, component) or (pattern, component, qualifier)

NAME_RULES: tuple[Rule, ...] = (
    # --- not one matrix of weights: SSM state tables, biases stored as 2-D rows (classify returns None)
    # --- recurrent mixers first: their q/k/v/out names would otherwise read as attention
    (_REC + r"\.(?:q|q_proj|query)$", "rec_q"),
    (_REC + r"\.(?:k|k_proj|key)$", "rec_k"),
    (_REC + r"\.(?:v|v_proj|value)$", "rec_v"),
    (_REC + r"\.(?:in_proj|in_proj_qkv|in_proj_qkvz|linear_x|qkv_proj|in_proj_x)$", "rec_in"),
    (
        _REC + r"\.(?:in_proj_z|z_proj|g_proj|g_a_proj|g_b_proj|output_gate|linear_y|receptance|ogate_preact"
        r"|igate_preact|fgate_preact|input_gate_weight|recurrent_gate_weight)$",
        "rec_gate",
    ),
    (
        _REC
        + r"\.(?:x_proj|dt_proj|x_proj_weight|dt_proj_weight|in_proj_a|in_proj_b|in_proj_ba|a_proj|b_proj"
        r"|f_proj|f_a_proj|f_b_proj)$",
        "rec_state",
    ),
    (_REC + r"\.(?:out_proj|o_proj|linear_out|output|proj_out)$", "rec_out"),
    (r"rwkv\.blocks\.\d+\.feed_forward\.key$", "ffn_up"),  # RWKV channel mix: key -> relu^2 -> value
    (r"rwkv\.blocks\.\d+\.feed_forward\.value$", "ffn_down"),
    (r"rwkv\.blocks\.\d+\.feed_forward\.receptance$", "ffn_gate"),
    # --- token indexers (DeepSeek-V3.2 / GLM DSA lightning indexer): route tokens as routers route experts
    (
        r"(?:^|\.)indexer\.(?:wq_b|wk|weights_proj|q_b_proj|kv_proj|k_proj|gate_proj|scorer\.weights_proj)$",
        "indexer",
    ),
    # --- multi-head latent attention (before q_proj / kv rules)
    (r"(?:^|\.)q_a_proj$", "q_a"),
    (r"(?:^|\.)q_b_proj$", "q_b"),
    (r"(?:^|\.)kv_a_proj_with_mqa$", "kv_a"),
    (r"(?:^|\.)kv_b_proj$", "kv_b"),
    (r"(?:^|\.)q_gate_proj$", "q_gate"),
    (r"(?:^|\.)query_key$", "q", "shared_qk"),  # Reformer LSH attention: one projection for Q and K
    (r"(?:^|\.)(?:o_a_proj)$", "o", "a"),
    (r"(?:^|\.)(?:o_b_proj)$", "o", "b"),
    (r"(?:^|\.)compressor\.(?:kv_proj|gate_proj)$", "aux", "compressor"),  # DeepSeek-V4 KV compression
    # --- linear-attention gates and decays met under an attention module name (Kimi, Bailing hybrids)
    (r"(?:^|\.)(?:forget_gate\.)?f_(?:a_|b_)?proj$", "rec_state"),
    (r"(?:^|\.)g_[ab]_proj$", "rec_gate"),
    (r"self_attn\.b_proj$", "rec_state"),
    # --- fused attention projections
    (r"(?:^|\.)(?:query_key_value|qkv_proj|wqkv|att_proj|w_pack|qkv)$", "qkv"),
    (r"(?:^|\.)in_proj_weight$", "qkv"),  # torch.nn.MultiheadAttention
    (r"(?:^|\.)c_attn$", "qkv"),  # GPT-2 (Conv1D), GPT-BigCode, Qwen-1
    (r"(?:^|\.)q_attn$", "q"),  # GPT-2 cross-attention query
    (_ATTN + r"\.kv_proj$", "kv"),  # JetMoE: K and V in one matrix
    # mixture-of-attention experts (JetMoE): per-expert query and output stacks
    (_ATTN + r"\.experts\.input_linear$", "q"),
    (_ATTN + r"\.experts\.output_linear$", "o"),
    # --- attention-output gates (before the FFN gate_proj rule)
    (_ATTN + r"\.(?:gate_proj|g_proj|output_gate|o_proj\.gate_proj)$", "attn_gate"),
    (r"(?:layernorm|norm)\.mlp\.fc[12]$", "aux", "norm_gate"),  # AXK2: a low-rank gate inside the norm
    # --- separate attention projections
    (r"(?:^|\.)(?:q_proj|query|query_proj|wq|q_lin|q_proj_weight|project_q)(?:\.linear)?$", "q"),
    (r"(?:^|\.)(?:k_proj|key|key_proj|wk|k_lin|k_proj_weight|project_k)(?:\.linear)?$", "k"),
    (
        r"(?:^|\.)(?:v_proj|value|value_proj|wv|v_lin|v_proj_weight|project_v|v_proj_current|v_proj_delayed)"
        r"(?:\.linear)?$",
        "v",
    ),
    (_ATTN + r"\.(?:q)$", "q"),  # T5
    (_ATTN + r"\.(?:k)$", "k"),
    (_ATTN + r"\.(?:v)$", "v"),
    (_ATTN + r"\.(?:o|o_proj|out_proj|dense|c_proj|wo|out_lin|proj|attention_out)(?:\.linear)?$", "o"),
    (r"attention\.output\.dense$", "o"),  # BERT, RoBERTa, DeBERTa, ViT (old names)
    (
        r"(?:^|\.)(?:o_proj|out_proj|attn_out|out_lin)(?:\.linear)?$",
        "o",
    ),  # out_lin: DistilBERT; attn_out: OLMo-1
    # --- routers (before the FFN rules: "mlp.gate" is the Mixtral/Qwen-MoE router, "gate_proj" the FFN gate)
    (r"(?:^|\.)shared_expert_gate$", "router", "shared"),
    (r"(?:^|\.)(?:router|moe_router)(?:\.layer|\.classifier|\.gate|\.proj)?$", "router"),
    (r"(?:mlp|block_sparse_moe|moe|mixer|feed_forward)\.gate$", "router"),
    (r"(?:^|\.)router\.[\w.]+$", "router"),  # a router's own small MLP (ZAYA)
    (r"(?:^|\.)modality_router$", "router", "modality"),
    # --- FFN (shared experts carry the qualifier "shared")
    (r"(?:shared_expert|shared_experts|shared_mlp)\.(?:gate_up_proj|input_linear)$", "ffn_gate_up", "shared"),
    (r"(?:shared_expert|shared_experts|shared_mlp)\.(?:gate_proj|w1)$", "ffn_gate", "shared"),
    (r"(?:shared_expert|shared_experts|shared_mlp)\.(?:up_proj|w3)$", "ffn_up", "shared"),
    (r"(?:shared_expert|shared_experts|shared_mlp)\.(?:down_proj|w2|output_linear)$", "ffn_down", "shared"),
    # ff_proj: OLMo-1, stored up first and gate second (see split_fused); Wi: ModernBERT; proj_up_gate: xLSTM
    (r"(?:^|\.)(?:gate_up_proj|ff_proj|w13|fc1_gate_up|mlp\.input_linear|moe\.input_linear)$", "ffn_gate_up"),
    (r"(?:^|\.)mlp\.wi$", "ffn_gate_up"),
    (r"(?:^|\.)(?:gate_proj|w1|wi_0|gate_linear|proj_up_gate|w_in\.w_0)$", "ffn_gate"),
    (
        r"(?:^|\.)(?:up_proj|w3|wi_1|wi|fc_in|c_fc|dense_h_to_4h|fc1|linear1|lin1|up_linear|proj_up|w_in\.w_1)$",
        "ffn_up",
    ),
    (
        r"(?:^|\.)(?:intermediate\.dense|feed_forward\.intermediate|ffn\.0|ff\.layer_1|feed_forward\.dense\.dense)$",
        "ffn_up",
    ),
    (
        r"(?:^|\.)(?:down_proj|w2|fc_out|dense_4h_to_h|fc2|linear2|lin2|down_linear|proj_down|w_out"
        r"|mlp\.output_linear|moe\.output_linear)$",
        "ffn_down",
    ),
    (r"(?:^|\.)(?:feed_forward\.output|ffn\.2|ff\.layer_2|feed_forward\.output\.dense)$", "ffn_down"),
    (_MLP + r"\.(?:wo|c_proj|dense|out)$", "ffn_down"),
    # BERT family: layer.N.output.dense is the FFN's down projection (attention.output.dense matched above)
    (r"(?:layer|layers|h|blocks|block)\.\d+\.output\.dense$", "ffn_down"),
    (r"(?:layer|layers|h|blocks|block)\.\d+\.ff_out$", "ffn_down"),  # OLMo-1 block ff_out
    # --- recognised block matrices that are neither attention nor MLP (class other, no warning)
    (r"(?:^|\.)(?:per_layer_input_gate|per_layer_projection)$", "aux", "per_layer"),
    (r"(?:^|\.)altup\.(?:correction_coefs|prediction_coefs)$", "aux", "altup"),
    (r"(?:^|\.)laurel\.(?:linear_left|linear_right)$", "aux", "laurel"),
    (
        r"(?:^|\.)(?:attn_hc|ffn_hc|attn_hyper_connection|ffn_hyper_connection)\.\w+$",
        "aux",
        "hyper_connection",
    ),
    (r"(?:^|\.)adapter_modules\.\w+\.dense[12]$", "aux", "adapter"),
    (r"(?:^|\.)\w+_adapter_list\.\d+\.\d+$", "aux", "adapter"),
    (r"(?:^|\.)self_attn\.dt_proj$", "aux", "dynamic_mask"),  # Doge: a mask from the values, not Q/K
    (
        r"(?:^|\.)(?:sink_proj|r_proj|rel_logits_proj\.proj|relative_position_bias\.(?:linear|proj))$",
        "aux",
        "position",
    ),
    (r"(?:^|\.)(?:rel_pos_h|rel_pos_w|relative_pos_embeddings)$", "aux", "position"),
    (r"(?:^|\.)sconv\.(?:weight_proj|static_weight)$", "aux", "conv"),
    (r"rel_attn\.r$", "aux", "position"),  # XLNet: relative position projection
    (r"(?:zamba|layers)\.\d+\.linear$", "aux", "shared_block"),  # Zamba: projection after the shared block
    # --- embeddings and heads
    (
        r"(?:^|\.)(?:wpe|position_embeddings|embed_positions|positions_embed|position_embedding)$",
        "embed",
        "position",
    ),
    (r"(?:^|\.)(?:token_type_embeddings)$", "embed", "token_type"),
    (r"(?:^|\.)(?:rel_embeddings|relative_attention_bias)$", "embed", "relative"),
    (r"(?:^|\.)(?:embed_tokens_per_layer|per_layer_model_projection)$", "embed", "per_layer"),
    (
        r"(?:^|\.)(?:vision_embed_tokens|embeddings_project|embedding_hidden_mapping_in|map_inputs_layer)$",
        "embed",
        "projection",
    ),
    (r"(?:^|\.)(?:altup_projections|altup_unembed_projections)\.\d+$", "embed", "altup"),
    (
        r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|shared|tok_embeddings|embeddings|tokens_embed"
        r"|word_embedding|transformer\.w)(?:\.\d+)?$",
        "embed",
    ),
    (r"(?:^|\.)(?:lm_head|embed_out|output|lm_heads\.\d+)$", "lm_head"),
    (r"(?:^|\.)(?:lm_head|predictions)\.decoder$", "lm_head"),
    (r"(?:^|\.)transformer\.ff_out$", "lm_head"),  # OLMo-1 untied output head
    # recognised heads that are no transformer projection: classed "other" without a warning
    (
        r"(?:^|\.)(?:classifier|score|qa_outputs|pre_classifier|classifier\.dense|classifier\.out_proj)$",
        "other",
        "classifier",
    ),
    (r"(?:^|\.)(?:pooler\.dense|pooler)$", "other", "pooler"),
    (
        r"(?:^|\.)(?:transform\.dense|lm_head\.dense|generator_predictions\.dense|predictions\.dense|vocab_transform)$",
        "other",
        "head_transform",
    ),
    (r"(?:^|\.)(?:summary|seq_relationship)$", "other", "summary"),
    (
        r"(?:^|\.)(?:visual_projection\.\d+|linear_[12]|mm_input_projection_weight|pre_projection|post_projection)$",
        "other",
        "projector",
    ),
    (r"\.lora_(?:embedding_)?[ab](?:\.[^.]+)?$", "other"),  # PEFT adapters: low-rank factors, not projections
)

#: Rules that hold in one family only: model_type -> rules tried before NAME_RULES.
FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    # DeepSeek-V4: one KV projection whose rows feed both K and V (K == V), its output in two factored halves
    "deepseek_v4": ((r"self_attn\.kv_proj$", "kv_shared"),),
    "hy_v4": ((r"self_attn\.kv_proj$", "kv_shared"),),
    # Qwen3-Next / Qwen3.5: q_proj holds the query and a sigmoid gate of the attention output, per head
    **{
        family: ((r"self_attn\.q_proj$", "q_gate"),)
        for family in (
            "qwen3_next",
            "qwen3_5",
            "qwen3_5_text",
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "qwen4_exp",
            "qwen4_exp_text",
        )
    },
    # CTRL: ffn.0 / ffn.2 of an nn.Sequential
    "ctrl": ((r"ffn\.0$", "ffn_up"), (r"ffn\.2$", "ffn_down")),
    # Moshi: fc1 holds the gate and the up projection (view(..., 2, -1): act(first) * second)
    "moshi": ((r"mlp\.fc1$", "ffn_gate_up"),),
    "rwkv": ((r"^head$", "lm_head"),),  # RWKV's output head: a bare top-level "head"
    # ZAYA: the router is a small MLP named mlp.gate
    "zaya": ((r"mlp\.gate\.[\w.]+$", "router"),),
}
_COMPILED_RULES = tuple(
    (re.compile(r[0], re.IGNORECASE), r[1], r[2] if len(r) > 2 else None) for r in NAME_RULES
)
_COMPILED_FAMILIES = {
    family: tuple((re.compile(r[0], re.IGNORECASE), r[1], r[2] if len(r) > 2 else None) for r in rules)
    for family, rules in FAMILY_RULES.items()
}

NON_MATRIX = re.compile(
    r"(?:\.bias$|_bias$|(?:^|\.|_)(?:ln|norm|layernorm|layer_norm|ln_\d|ln_f|rmsnorm)(?:\.|_|\d|$)|norm\.weight$"
    r"|(?:^|\.)(?:cls_token|mask_token)$)",
    re.IGNORECASE,
)
#: Parameters that are never a matrix of weights, whatever their shape: biases stored as rows, SSM decay tables.
NEVER_MATRIX = re.compile(
    r"(?:\.bias$|_bias$|(?:^|\.)(?:A_log|D|dt_bias|time_decay|time_first|mask_emb)$|(?:^|\.)norm\.\w+$)"
)
EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
EXPERT_STACK = re.compile(
    r"(?:^|\.)(?:experts|shared_experts)\.(?:gate_up_proj|down_proj|up_proj|gate_proj|w1|w2|w3|input_linear"
    r"|output_linear)$|(?:^|\.)(?:mlp|moe)\.(?:input_linear|output_linear)$"
)
#: 3-D parameters that are one matrix stored per head (fitted whole): XLNet's q/k/v/o, Zamba's per-head SSM projections
ONE_MATRIX_3D = re.compile(r"(?:rel_attn\.[qkvo]|_proj_weight|rg_lru\.\w+_weight)$")
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
CROSS = re.compile(r"(?:encdecattention|crossattention|encoder_attn|cross_attn|enc_dec_attn)", re.IGNORECASE)
STACK_SEGMENT = re.compile(r"(?:^|\.)(encoder|decoder)(?:\.|$)")
T5_STACK = re.compile(r"(?:^|\.)(?:encoder|decoder)\.block\.\d+")

#: Prefixes wrappers put in front of a model's own parameter names (torch.compile, PEFT, DDP/DeepSpeed, FSDP1,
#: activation checkpointing): dropped from display names, kept in the store (``param_name``).
WRAPPER_PREFIXES = (
    "_orig_mod.",
    "base_model.model.",
    "module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)
_WRAPPER_SEGMENTS = re.compile(
    r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module|_forward_module|base_model\.model)\."
    r"|\.base_layer(?=\.|$)"
)

# what a layer's mixer is, in the layer_types of hybrid configs: these are no softmax attention
_RECURRENT_LAYER_TYPES = {
    "linear_attention",
    "mamba",
    "mamba2",
    "conv",
    "recurrent",
    "ssm",
    "lightning",
    "linear",
    "m",
    "deltanet",
    "gated_deltanet",
    "kda",
    "short_conv",
}


def strip(name: str) -> str:
    """The module path a rule sees: no trailing ``.weight``, no PEFT ``.base_layer`` wrapper."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.replace(".base_layer", "")


def display_name(name: str) -> str:
    """A parameter's name as dashboards and reports show it: without the prefixes and segments wrappers add
    (``_orig_mod.`` of torch.compile, ``base_model.model.`` of PEFT, ``module.`` of DDP/DeepSpeed,
    ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, PEFT's ``.base_layer``). Split keys keep their
    ``[q]`` suffix. The run store keeps the real name."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return _WRAPPER_SEGMENTS.sub("", name)


def match_rules(
    name: str, overrides: Iterable[tuple[re.Pattern[str], str]] = (), family: str | None = None
) -> tuple[str, bool]:
    """(component, recognised) for a parameter name; overrides are searched in the full name first."""
    component, _, recognised = match_rule(name, overrides, family)
    return component, recognised


def match_rule(
    name: str, overrides: Iterable[tuple[re.Pattern[str], str]] = (), family: str | None = None
) -> tuple[str, str | None, bool]:
    """(component, qualifier, recognised): overrides, then the family's rules, then NAME_RULES."""
    for pattern, component in overrides:
        if pattern.search(name):
            return component, None, True
    stripped = display_name(strip(name))
    for pattern, component, qualifier in _COMPILED_FAMILIES.get(family or "", ()) + _COMPILED_RULES:
        if pattern.search(stripped):
            return component, qualifier, True
    return "other", None, False


def recurrent_layers(config: Any) -> frozenset[int]:
    """Indices of the layers whose token mixer is no softmax attention (linear attention, Mamba, convolution,
    recurrence), from a hybrid config's ``layer_types`` / ``layers_block_type`` / ``block_types``."""
    for key in ("layer_types", "layers_block_type", "block_types"):
        kinds = config_value(config, key)
        if isinstance(kinds, (list, tuple)) and kinds:
            n = config_value(config, "num_hidden_layers")
            if key == "block_types" and isinstance(n, int):
                kinds = (list(kinds) * (n // len(kinds) + 1))[:n]
            return frozenset(i for i, kind in enumerate(kinds) if str(kind).lower() in _RECURRENT_LAYER_TYPES)
    return frozenset()


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

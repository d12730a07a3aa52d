"""The role map: which layer, component and class every weight matrix of a transformer belongs to.

The diagnostic is per class (science.md section 3): Selection (W_q, W_k), Transmission (W_o and the FFN), Value
(W_v), and fused projections that mix them. Naming rules are data (``_NAME_RULES``: a regex on the parameter's module
path -> component, first match wins), so a new family is a line in a table, not a new branch. Fused projections are
split by layout rules (``split_fused``) that follow each architecture's forward pass, as documented in docs/roles.md.

Everything here is pure: names, shapes and config values in, roles and tensor views out. Nothing imports
transformers; a config may be a ``PretrainedConfig``, a plain dict (a ``config.json``), a model, or None.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weibull_monitor.expectations import selection_expectation

__all__ = [
    "COMPONENTS",
    "KLASS_OF_COMPONENT",
    "Role",
    "UnknownWeightsWarning",
    "attention_kind",
    "classify",
    "fused_components",
    "model_roles",
    "selection_expectation_for",
    "split_fused",
    "split_key",
    "view_role",
]

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


class UnknownWeightsWarning(UserWarning):
    """Raised once per :func:`model_roles` call, listing the 2-D weights no rule recognised (classed ``other``)."""


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


# --------------------------------------------------------------------------------------------------------------
# Naming rules. Each regex is searched in the parameter name with its trailing ".weight" removed; first match wins.
# Context words (attention vs mlp) disambiguate names that several families reuse (c_proj, dense, wo, output.dense).
_ATTN = r"(?:attn|attention|self_attn|self_attention|selfattention|encdecattention|crossattention|encoder_attn|cross_attn)"
_MLP = (
    r"(?:mlp|ffn|feed_forward|feedforward|densereludense|ff|block_sparse_moe|moe|shared_expert|experts\.\d+)"
)

_NAME_RULES: tuple[tuple[str, str], ...] = (
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
_COMPILED_RULES = tuple((re.compile(pattern, re.IGNORECASE), component) for pattern, component in _NAME_RULES)

_NON_MATRIX = re.compile(
    r"(?:\.bias$|_bias$|(?:^|\.|_)(?:ln|norm|layernorm|layer_norm|ln_\d|ln_f|rmsnorm)(?:\.|_|\d|$)|norm\.weight$"
    r"|(?:^|\.)(?:cls_token|mask_token)$)",
    re.IGNORECASE,
)
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
_EXPERT_STACK = re.compile(r"(?:^|\.)experts\.(?:gate_up_proj|down_proj|up_proj|gate_proj|w1|w2|w3)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_CROSS = re.compile(r"(?:encdecattention|crossattention|encoder_attn|cross_attn|enc_dec_attn)", re.IGNORECASE)
_STACK_SEGMENT = re.compile(r"(?:^|\.)(encoder|decoder)(?:\.|$)")
_T5_STACK = re.compile(r"(?:^|\.)(?:encoder|decoder)\.block\.\d+")


def _strip(name: str) -> str:
    """The module path a rule sees: no trailing ``.weight``, no PEFT ``.base_layer`` wrapper."""
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name.replace(".base_layer", "")


def _match_rules(name: str, overrides: Iterable[tuple[re.Pattern[str], str]] = ()) -> tuple[str, bool]:
    """(component, recognised) for a parameter name; overrides are searched in the full name first."""
    for pattern, component in overrides:
        if pattern.search(name):
            return component, True
    stripped = _strip(name)
    for pattern, component in _COMPILED_RULES:
        if pattern.search(stripped):
            return component, True
    return "other", False


def _compile_overrides(
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


# --------------------------------------------------------------------------------------------------------------
# Config access: PretrainedConfig, dict (config.json), a model (its .config) or None.
def _as_config(obj: Any) -> Any:
    if obj is None or isinstance(obj, Mapping):
        return obj
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "config", None)
    return obj


def _cfg(config: Any, *keys: str, default: Any = None) -> Any:
    """The first present key among ``keys``, looking into a nested text_config for multimodal configs."""
    config = _as_config(config)
    if config is None:
        return default
    for source in (config, _cfg_nested(config)):
        if source is None:
            continue
        for key in keys:
            value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
            if value is not None:
                return value
    return default


def _cfg_nested(config: Any) -> Any:
    for key in ("text_config", "llm_config"):
        nested = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if nested is not None:
            return nested
    return None


def _model_type(config: Any) -> str | None:
    value = _cfg(config, "model_type")
    return str(value).lower() if value else None


def _is_encoder_decoder(config: Any) -> bool | None:
    config = _as_config(config)
    if config is None:
        return None
    value = (
        config.get("is_encoder_decoder")
        if isinstance(config, Mapping)
        else getattr(config, "is_encoder_decoder", None)
    )
    return None if value is None else bool(value)


# --------------------------------------------------------------------------------------------------------------
def _layer_of(name: str) -> int | None:
    without_expert = _EXPERT_INDEX.sub(".", name)
    found = _LAYER_INDEX.search(without_expert)
    return int(found.group(1)) if found else None


def _stack_of(name: str, encoder_decoder: bool | None) -> str | None:
    if _CROSS.search(name):
        return "cross"
    if encoder_decoder is False:
        return None
    if encoder_decoder or _T5_STACK.search(name):
        found = _STACK_SEGMENT.search(name)
        return found.group(1) if found else None
    return None


def _parts_for(component: str, name: str, shape: tuple[int, ...] | None, stacked: bool) -> tuple[str, ...]:
    if stacked:
        n_experts = shape[0] if shape else 0
        inner = fused_inner_components(component, name) or (component,)
        return tuple(f"e{e}.{c}" for e in range(n_experts) for c in inner)
    return fused_inner_components(component, name)


def fused_inner_components(component: str, name: str) -> tuple[str, ...]:
    """The components a fused 2-D matrix splits into (empty for a plain one)."""
    if component == "qkv":
        if _CROSS.search(name) and _strip(name).endswith("c_attn"):
            return ("k", "v")  # GPT-2 / BigCode cross-attention: query lives in q_attn
        return ("q", "k", "v")
    if component == "ffn_gate_up":
        return ("ffn_gate", "ffn_up")
    return ()


def classify(
    name: str, shape: Iterable[int] | None = None, config: Any = None, *, overrides: Any = None
) -> Role | None:
    """The role of parameter ``name`` or None when it is no weight matrix (norms, biases, vectors, conv kernels).

    ``shape`` (any iterable of ints, e.g. ``tensor.shape``) lets 1-D and 4-D parameters be rejected and sizes expert
    stacks; ``config`` (PretrainedConfig, config.json dict, model or None) tells encoder-decoder stacks apart.
    ``overrides`` (regex -> component, searched in the full name) win over the built-in rules.
    Unrecognised 2-D weights come back as ``Role(component="other", klass="other")``.
    """
    return _classify(name, shape, config, _compile_overrides(overrides), _is_encoder_decoder(config))[0]


def _classify(
    name: str, shape: Iterable[int] | None, config: Any, compiled: list, encoder_decoder: bool | None
) -> tuple[Role | None, bool]:
    dims = tuple(int(d) for d in shape) if shape is not None else None
    stacked = bool(_EXPERT_STACK.search(_strip(name)))
    if dims is not None:
        if stacked and len(dims) != 3:
            stacked = False
        if not stacked and len(dims) != 2:
            return None, True
    elif not any(p.search(name) for p, _ in compiled) and _NON_MATRIX.search(name):
        return None, True  # no shape given: judge by name (norms, biases, class tokens)
    component, recognised = _match_rules(name, compiled)
    expert_found = _EXPERT_INDEX.search(name)
    expert = int(expert_found.group(1)) if expert_found else None
    role = Role(
        layer=_layer_of(name) if component not in ("embed", "lm_head") else None,
        component=component,
        klass=KLASS_OF_COMPONENT[component],
        expert=expert,
        stack=_stack_of(name, encoder_decoder),
        parts=_parts_for(component, name, dims, stacked),
        stacked=stacked,
    )
    return role, recognised


def fused_components(role: Role) -> tuple[str, ...]:
    """The keys :func:`split_fused` returns for a parameter of this role (empty when it is not fused or stacked)."""
    return role.parts


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


def model_roles(model: torch.nn.Module, overrides: Any = None) -> dict[str, Role]:
    """Roles of every weight matrix of ``model`` (2-D parameters and 3-D expert stacks), keyed by parameter name.

    Reads ``model.config`` when there is one. Tied weights (an lm_head that is the embedding) appear once, under
    the first name ``named_parameters`` gives them. Unrecognised 2-D weights are classed ``other`` and listed in
    one :class:`UnknownWeightsWarning`. ``overrides`` (regex -> component) win over the built-in rules.
    """
    from weibull_monitor._shards import global_shape  # ZeRO-3 / FSDP1 parameters hold a local slice only

    compiled = _compile_overrides(overrides)
    config = getattr(model, "config", None)
    names = [name for name, _ in model.named_parameters()]
    encoder_decoder = _is_encoder_decoder(config)
    if encoder_decoder is None:
        segments = {m.group(1) for n in names for m in [_STACK_SEGMENT.search(n)] if m}
        encoder_decoder = segments == {"encoder", "decoder"}
    roles: dict[str, Role] = {}
    unknown: list[str] = []
    for name, param in model.named_parameters():  # deduplicates tied parameters
        role, recognised = _classify(name, global_shape(param), config, compiled, encoder_decoder)
        if role is None:
            continue
        roles[name] = role
        if not recognised:
            unknown.append(name)
    if unknown:
        warnings.warn(
            f"{len(unknown)} weight matrices match no role rule and are classed 'other' "
            f"(pass overrides={{regex: component}} to name them): {', '.join(unknown)}",
            UnknownWeightsWarning,
            stacklevel=2,
        )
    return roles


# --------------------------------------------------------------------------------------------------------------
# Attention kind


def attention_kind(model_or_config: Any, names: Iterable[str] | None = None) -> str | None:
    """'fused', 'mha', 'gqa' or 'mqa' for a model or config; None when it cannot be told.

    ``fused`` wins whenever the model stores Q, K and V in one matrix (the paper's "transitional" Selection);
    otherwise the config's key/value head count decides. ``names`` (parameter names) replace the model's own.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = _as_config(model_or_config)
    if names is None and model is not None:
        names = [n for n, _ in model.named_parameters()]
    name_list = list(names or [])
    components = {}
    for name in name_list:
        component, _ = _match_rules(name)
        if component == "qkv" and not _CROSS.search(name):
            return "fused"
        components.setdefault(component, name)
    model_type = _model_type(config)
    if model_type in ("gpt_neox", "bloom", "falcon", "mpt", "phi3", "gpt2", "phimoe") and not name_list:
        return "fused"
    heads = _cfg(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    kv_heads = _cfg(
        config, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num"
    )
    if _cfg(config, "multi_query", "multi_query_attention") is True:
        kv_heads = 1
    if heads is not None:
        kv_heads = heads if kv_heads is None else kv_heads
        return _kind_from_heads(int(heads), int(kv_heads))
    if model is not None and "q" in components and "k" in components:
        from weibull_monitor._shards import global_shape

        params = dict(model.named_parameters())
        q_rows, k_rows = global_shape(params[components["q"]])[0], global_shape(params[components["k"]])[0]
        return "mha" if q_rows == k_rows else "gqa"
    return None  # separate Q/K but neither head counts nor shapes: GQA cannot be told from MHA


def _kind_from_heads(heads: int, kv_heads: int) -> str:
    if kv_heads == heads:
        return "mha"
    if kv_heads == 1:
        return "mqa"
    return "gqa"


def selection_expectation_for(model_or_config: Any, names: Iterable[str] | None = None) -> str | None:
    """'deep', 'mild' or 'transitional' (see weibull_monitor.expectations) for a model's attention kind."""
    return selection_expectation(attention_kind(model_or_config, names))


# --------------------------------------------------------------------------------------------------------------
# Splitting fused parameters. Every layout returns views of ``weight`` in nn.Linear orientation [out, in].


def _heads(config: Any, hidden: int | None = None, multi_query: bool = True) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a config; ``multi_query=False`` ignores a multi_query flag."""
    heads = _cfg(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    if heads is None:
        raise ValueError(
            "splitting this fused projection needs the number of attention heads: pass the model config"
        )
    heads = int(heads)
    hidden = hidden or _cfg(config, "hidden_size", "n_embd", "d_model")
    head_dim = _cfg(config, "head_dim") or (int(hidden) // heads if hidden else None)
    if head_dim is None:
        raise ValueError(
            "splitting this fused projection needs hidden_size or head_dim: pass the model config"
        )
    kv_heads = _cfg(config, "num_key_value_heads", "num_kv_heads", "n_kv_heads")
    if multi_query and _cfg(config, "multi_query", "multi_query_attention") is True:
        kv_heads = 1
    return heads, int(kv_heads) if kv_heads is not None else heads, int(head_dim)


def _concat_rows(
    weight: torch.Tensor, sizes: tuple[int, ...], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    if sum(sizes) != weight.shape[0]:
        raise ValueError(
            f"fused weight has {weight.shape[0]} rows; this layout expects {sizes} (sum {sum(sizes)})"
        )
    return dict(zip(keys, torch.split(weight, list(sizes), dim=0), strict=True))


def _per_head_interleaved(
    weight: torch.Tensor, heads: int, head_dim: int, as_matrix: bool
) -> dict[str, torch.Tensor]:
    # Output rows are laid out [head, (q|k|v), head_dim]: GPT-NeoX, BLOOM, classic Falcon, GPT-BigCode without MQA.
    if weight.shape[0] != heads * 3 * head_dim:
        raise ValueError(
            f"fused weight has {weight.shape[0]} rows; expected heads*3*head_dim = {heads * 3 * head_dim}"
        )
    blocks = weight.view(heads, 3, head_dim, weight.shape[1])
    out = {key: blocks[:, i] for i, key in enumerate(("q", "k", "v"))}
    return {k: v.reshape(heads * head_dim, -1) for k, v in out.items()} if as_matrix else out


def _grouped(
    weight: torch.Tensor, heads: int, kv_heads: int, head_dim: int, as_matrix: bool
) -> dict[str, torch.Tensor]:
    # Falcon new_decoder_architecture: rows are [kv group, (q_1..q_n, k, v), head_dim].
    per_group = heads // kv_heads
    if weight.shape[0] != kv_heads * (per_group + 2) * head_dim:
        raise ValueError(
            f"fused weight has {weight.shape[0]} rows; Falcon grouped layout expects "
            f"{kv_heads * (per_group + 2) * head_dim}"
        )
    blocks = weight.view(kv_heads, per_group + 2, head_dim, weight.shape[1])
    out = {"q": blocks[:, :per_group], "k": blocks[:, per_group], "v": blocks[:, per_group + 1]}
    if not as_matrix:
        return out
    return {k: v.reshape(-1, weight.shape[1]) for k, v in out.items()}


def _qkv_sizes(config: Any, rows: int, cols: int) -> tuple[int, int, int]:
    """Row counts of concatenated [Q; K; V] blocks: from the config (GQA aware), else equal thirds."""
    try:
        heads, kv_heads, head_dim = _heads(config, cols)
    except ValueError:
        if rows % 3:
            raise ValueError(f"cannot split {rows} fused rows into Q, K, V without a config") from None
        return rows // 3, rows // 3, rows // 3
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def split_fused(
    name: str, weight: torch.Tensor, config: Any = None, *, as_matrix: bool = True
) -> dict[str, torch.Tensor]:
    """Split a fused parameter into its parts, laid out exactly as the architecture's forward pass slices it.

    Returns ``{component: tensor}`` in nn.Linear orientation [out, in]: ``q``/``k``/``v`` for fused attention,
    ``ffn_gate``/``ffn_up`` for fused gate-up, and ``e<i>.<component>`` for 3-D expert stacks. Contiguous block
    layouts (Phi-3, GPT-2's transposed Conv1D, MPT, OLMo-1, MultiheadAttention, GQA/MQA concatenations, gate-up,
    experts) give views sharing the parameter's storage. Per-head interleaved layouts (GPT-NeoX, BLOOM, Falcon,
    GPT-BigCode without MQA) cannot be a 2-D view: ``as_matrix=True`` returns 2-D copies, ``as_matrix=False``
    returns strided views shaped [heads, head_dim, in] (the same elements, no copy).
    Raises ValueError when the parameter is not fused or the layout cannot be told from ``config``.
    """
    config = _as_config(config)
    stripped = _strip(name)
    role = classify(name, weight.shape, config)
    if role is None or not role.parts:
        raise ValueError(f"{name!r} is not a fused or stacked parameter")
    if role.stacked:
        out: dict[str, torch.Tensor] = {}
        for expert in range(weight.shape[0]):
            inner = (
                _split_2d(stripped, role, weight[expert], config, as_matrix)
                if role.component == "ffn_gate_up"
                else {role.component: weight[expert]}
            )
            out.update({f"e{expert}.{k}": v for k, v in inner.items()})
        return out
    return _split_2d(stripped, role, weight, config, as_matrix)


def _split_2d(
    stripped: str, role: Role, weight: torch.Tensor, config: Any, as_matrix: bool
) -> dict[str, torch.Tensor]:
    if weight.ndim != 2:
        raise ValueError(f"{stripped!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    model_type = _model_type(config)
    last = stripped.rsplit(".", 1)[-1].lower()
    rows, cols = weight.shape
    if role.component == "ffn_gate_up":
        if rows % 2:
            raise ValueError(f"{stripped!r}: fused gate-up weight has an odd row count {rows}")
        first, second = torch.split(weight, rows // 2, dim=0)
        if (
            last == "ff_proj"
        ):  # OLMo-1: `x, x_gate = x.chunk(2, dim=-1)`, then act(x_gate) * x -> up comes first
            return {"ffn_gate": second, "ffn_up": first}
        return {"ffn_gate": first, "ffn_up": second}  # Phi-3, MoE experts: `gate, up = ....chunk(2, dim=-1)`

    # fused attention
    if last == "in_proj_weight" or last == "wqkv" or last == "w_pack":
        # MultiheadAttention (_in_projection_packed), MPT (chunk(3)), Baichuan: equal concatenated thirds.
        return _concat_rows(weight, (rows // 3,) * 3, ("q", "k", "v"))
    if last == "c_attn":
        if model_type == "gpt2" or (model_type is None and cols == len(role.parts) * rows):
            # Conv1D stores [in, out]; the forward splits the output columns into Q, K, V (or K, V for cross).
            keys = role.parts
            width = cols // len(keys)
            return {k: weight[:, i * width : (i + 1) * width].T for i, k in enumerate(keys)}
        if model_type == "gpt_bigcode":
            heads, _, head_dim = _heads(config, cols)
            if role.parts == ("k", "v"):
                return _concat_rows(weight, (rows // 2, rows // 2), ("k", "v"))
            if _cfg(config, "multi_query") is not False:
                return _concat_rows(weight, (heads * head_dim, head_dim, head_dim), ("q", "k", "v"))
            return _per_head_interleaved(weight, heads, head_dim, as_matrix)
        return _concat_rows(weight, (rows // 3,) * 3, ("q", "k", "v"))  # Qwen-1 style Linear c_attn
    if last == "query_key_value":
        if model_type in ("gpt_neox", "gpt_neox_japanese", "bloom"):
            heads, _, head_dim = _heads(config, cols)
            return _per_head_interleaved(weight, heads, head_dim, as_matrix)
        if model_type in ("falcon", "refinedweb", "refinedwebmodel", "rw"):
            heads, kv_heads, head_dim = _heads(config, cols, multi_query=False)
            if _cfg(config, "new_decoder_architecture"):
                return _grouped(weight, heads, kv_heads, head_dim, as_matrix)
            if _cfg(config, "multi_query"):
                return _concat_rows(weight, (heads * head_dim, head_dim, head_dim), ("q", "k", "v"))
            return _per_head_interleaved(weight, heads, head_dim, as_matrix)
        raise ValueError(
            f"{stripped!r}: query_key_value layouts differ between GPT-NeoX, BLOOM and Falcon; pass a config with "
            f"model_type (got {model_type!r})"
        )
    if last in ("qkv_proj", "att_proj", "qkv"):
        # Phi-3: qkv[..., :q], then kv_heads*head_dim each; OLMo-1: qkv.split(fused_dims) with the same sizes.
        return _concat_rows(weight, _qkv_sizes(config, rows, cols), ("q", "k", "v"))
    raise ValueError(f"{stripped!r}: no split layout known for this fused parameter")

"""The built-in fused layouts, in the order :func:`~weibull_monitor.models.split_fused` tries them, each with the model
types whose forward pass the layout probe checked it against (``weibull-monitor roles --sweep``; docs/roles.md).

A layout told by a name or a shape no other family uses (torch's ``in_proj_weight``, GPT-2's Conv1D ``c_attn``,
OLMo-1's native ``att_proj``/``ff_proj``) carries ``families=None``; every other layout splits only the families
listed, and any other family keeps its fused parameter whole, with the reason (never a guess).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from weibull_monitor.models.config import config_value, head_counts
from weibull_monitor.models.layouts import FusedLayout, LayoutQuery, register_layout

__all__ = ["VERIFIED", "concat_rows", "per_head_interleaved"]

Split = Callable[[torch.Tensor, LayoutQuery, bool], dict[str, torch.Tensor]]

#: layout name -> model types on which the probe verified it (the full sweep; tests/models/test_sweep.py keeps a
#: representative subset in CI). Regenerate with ``weibull-monitor roles --sweep --discover``.
VERIFIED: dict[str, frozenset[str | None]] = {
    "gate_up.chunk": frozenset(
        {
            "afmoe",
            "axk1",
            "bailing_hybrid",
            "beam",
            "cohere2_moe",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "deepseek_v4",
            "ernie4_5_moe",
            "exaone_moe",
            "flex_olmo",
            "glm",
            "glm4",
            "glm4_moe",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "granitemoe",
            "granitemoe_swa",
            "granitemoehybrid",
            "granitemoeshared",
            "hy_v3",
            "hy_v4",
            "inkling_text",
            "jamba",
            "jetmoe",
            "kimi_linear",
            "kolibri1",
            "laguna",
            "lara_mini",
            "lfm2_moe",
            "longcat_flash",
            "mellum",
            "mimo_v2_flash",
            "minimax",
            "minimax_m2",
            "minimax_m3_vl_text",
            "mixtral",
            "modernbert-decoder",
            "moshi",
            "olmoe",
            "phi3",
            "phi4_multimodal",
            "phimoe",
            "qwen2_moe",
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "qwen3_moe",
            "qwen3_next",
            "sarvam_mla",
            "sarvam_moe",
            "solar_open",
            "zamba2",
            "zaya",
        }
    ),
    "experts.gate_up.columns": frozenset({"aria_text", "llama4", "llama4_text"}),
    "experts.gate_up.interleaved_columns": frozenset({"gpt_oss"}),
    "qkv.thirds": frozenset({"mpt"}),
    # GPT-2's Conv1D shape rule also holds without a config (model type None): the probe confirmed it on GPT-2
    "gpt2.c_attn": frozenset({None, "gpt2", "gpt-sw3", "openai-gpt"}),
    "gpt_bigcode.c_attn": frozenset({"gpt_bigcode"}),
    "neox.per_head": frozenset({"bloom", "fuyu", "gpt_neox", "gpt_neox_japanese", "persimmon"}),
    "falcon.query_key_value": frozenset({"falcon"}),
    "qkv.concatenated": frozenset({"phi3", "phi4_multimodal"}),
    "codegen.qkv_proj": frozenset({"codegen"}),
    "mla.kv_a": frozenset(
        {
            "axk1",
            "axk2",
            "bailing_hybrid",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "hy_v4",
            "kimi_linear",
            "longcat_flash",
            "minicpm3",
            "sarvam_mla",
            "youtu",
        }
    ),
    "q_gate.per_head": frozenset(
        {"axk2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next"}
    ),
    "kv.halves": frozenset({"jetmoe"}),
}
VERIFIED["mla.kv_b"] = VERIFIED["mla.kv_a"]


# ---------------------------------------------------------------------------------------------------------------
# Splitting helpers


def concat_rows(
    weight: torch.Tensor, sizes: tuple[int, ...], keys: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Concatenated row blocks [A; B; ...] of the given sizes, as views."""
    if sum(sizes) != weight.shape[0]:
        raise ValueError(
            f"fused weight has {weight.shape[0]} rows; this layout expects {sizes} (sum {sum(sizes)})"
        )
    return dict(zip(keys, torch.split(weight, list(sizes), dim=0), strict=True))


def per_head_blocks(
    weight: torch.Tensor, sizes: tuple[int, ...], keys: tuple[str, ...], as_matrix: bool
) -> dict[str, torch.Tensor]:
    """Output rows laid out [head, (part_0 | part_1 | ...), ...] with ``sizes`` rows per part per head."""
    period = sum(sizes)
    if weight.shape[0] % period:
        raise ValueError(f"fused weight has {weight.shape[0]} rows, not a multiple of {period} per head")
    blocks = weight.view(weight.shape[0] // period, period, weight.shape[1])
    out, start = {}, 0
    for key, size in zip(keys, sizes):
        view = blocks[:, start : start + size]
        out[key] = view.reshape(-1, weight.shape[1]) if as_matrix else view
        start += size
    return out


def per_head_interleaved(
    weight: torch.Tensor, heads: int, head_dim: int, as_matrix: bool
) -> dict[str, torch.Tensor]:
    """Output rows laid out [head, (q|k|v), head_dim]: GPT-NeoX, BLOOM, classic Falcon, GPT-BigCode without MQA."""
    if weight.shape[0] != heads * 3 * head_dim:
        raise ValueError(
            f"fused weight has {weight.shape[0]} rows; expected heads*3*head_dim = {heads * 3 * head_dim}"
        )
    return per_head_blocks(weight, (head_dim,) * 3, ("q", "k", "v"), as_matrix)


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
    return per_head_blocks(weight, (per_group * head_dim, head_dim, head_dim), ("q", "k", "v"), as_matrix)


def _qkv_sizes(config: Any, cols: int) -> tuple[int, int, int]:
    """Row counts of concatenated [Q; K; V] blocks from the config (GQA aware)."""
    heads, kv_heads, head_dim = head_counts(config, cols)
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def _int(config: Any, key: str) -> int:
    value = config_value(config, key)
    if value is None:
        raise ValueError(f"splitting this projection needs {key} in the config")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# The built-in layouts


def _gate_up_halves(up_first: bool) -> Split:
    def split(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
        rows = weight.shape[0]
        if rows % 2:
            raise ValueError(f"{query.name!r}: fused gate-up weight has an odd row count {rows}")
        first, second = torch.split(weight, rows // 2, dim=0)
        return {"ffn_gate": second, "ffn_up": first} if up_first else {"ffn_gate": first, "ffn_up": second}

    return split


def _gate_up_columns(interleaved: bool) -> Split:
    # experts stored transposed [hidden, 2 * intermediate]: gate and up are columns (GPT-OSS interleaves them)
    def split(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
        cols = weight.shape[1]
        if cols % 2:
            raise ValueError(f"{query.name!r}: fused gate-up weight has an odd column count {cols}")
        if interleaved:
            return {"ffn_gate": weight[:, 0::2].T, "ffn_up": weight[:, 1::2].T}
        return {"ffn_gate": weight[:, : cols // 2].T, "ffn_up": weight[:, cols // 2 :].T}

    return split


def _thirds(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    if weight.shape[0] % 3:
        raise ValueError(f"{query.name!r}: {weight.shape[0]} rows do not split into equal thirds")
    return concat_rows(weight, (weight.shape[0] // 3,) * 3, ("q", "k", "v"))


def _gpt2_conv1d(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # Conv1D stores [in, out]; the forward splits the output columns into Q, K, V (or K, V for cross-attention).
    keys = query.role.parts
    width = weight.shape[1] // len(keys)
    return {k: weight[:, i * width : (i + 1) * width].T for i, k in enumerate(keys)}


def _is_gpt2_conv1d(query: LayoutQuery) -> bool:
    # GPT-2's Conv1D stores [in, parts * in]; a Linear c_attn stores [3 * out, in]: the shape tells them apart
    if query.last != "c_attn" or len(query.shape) != 2:
        return False
    rows, cols = query.shape
    return cols == len(query.role.parts) * rows


def _gpt_bigcode(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    heads, _, head_dim = head_counts(query.config, cols)
    if query.role.parts == ("k", "v"):
        return concat_rows(weight, (rows // 2, rows // 2), ("k", "v"))
    if config_value(query.config, "multi_query") is not False:
        return concat_rows(weight, (heads * head_dim, head_dim, head_dim), ("q", "k", "v"))
    return per_head_interleaved(weight, heads, head_dim, as_matrix)


def _neox(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    heads, _, head_dim = head_counts(query.config, weight.shape[1])
    return per_head_interleaved(weight, heads, head_dim, as_matrix)


def _falcon(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    heads, kv_heads, head_dim = head_counts(query.config, weight.shape[1], multi_query=False)
    if config_value(query.config, "new_decoder_architecture"):
        return _grouped(weight, heads, kv_heads, head_dim, as_matrix)
    if config_value(query.config, "multi_query"):
        return concat_rows(weight, (heads * head_dim, head_dim, head_dim), ("q", "k", "v"))
    return per_head_interleaved(weight, heads, head_dim, as_matrix)


def _concat_gqa(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # Phi-3: qkv[..., :q], then kv_heads*head_dim each; OLMo-1: qkv.split(fused_dims) with the same sizes.
    return concat_rows(weight, _qkv_sizes(query.config, weight.shape[1]), ("q", "k", "v"))


def _codegen(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # CodeGen: qkv.view(..., mp_num=4, 3 * local_dim) then split(local_dim) into query, VALUE, key
    local = weight.shape[0] // 3 // 4
    parts = per_head_blocks(weight, (local, local, local), ("q", "v", "k"), as_matrix)
    return {"q": parts["q"], "k": parts["k"], "v": parts["v"]}


def _mla_kv_a(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # kv_a_proj_with_mqa(x).split([kv_lora_rank, qk_rope_head_dim]): the K/V latent, then the shared rope key
    rank = _int(query.config, "kv_lora_rank")
    return concat_rows(weight, (rank, weight.shape[0] - rank), ("kv_latent", "k_rope"))


def _mla_kv_b(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # kv_b_proj(latent).view(..., heads, qk_nope_head_dim + v_head_dim).split([nope, v])
    nope, v = _int(query.config, "qk_nope_head_dim"), _int(query.config, "v_head_dim")
    return per_head_blocks(weight, (nope, v), ("k", "v"), as_matrix)


def _q_gate(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # Qwen3-Next: q_proj(x).view(..., heads, 2 * head_dim).chunk(2): per head the query, then its gate;
    # AXK2 q_gate_proj: per head qk_head_dim rows of query, then v_head_dim rows of gate
    keys = query.role.parts
    if keys[0] == "q_b":
        nope, rope = _int(query.config, "qk_nope_head_dim"), _int(query.config, "qk_rope_head_dim")
        return per_head_blocks(weight, (nope + rope, _int(query.config, "v_head_dim")), keys, as_matrix)
    head_dim = config_value(query.config, "head_dim") or head_counts(query.config, weight.shape[1])[2]
    return per_head_blocks(weight, (int(head_dim), int(head_dim)), keys, as_matrix)


def _kv_halves(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # JetMoE: kv_proj(x).chunk(2) -> key, value
    return concat_rows(weight, (weight.shape[0] // 2,) * 2, ("k", "v"))


def _is(component: str, *lasts: str) -> Callable[[LayoutQuery], bool]:
    return lambda q: q.role.component == component and (not lasts or q.last in lasts)


def _layout(
    name: str, applies: Callable[[LayoutQuery], bool], split: Split, verified: bool = True
) -> FusedLayout:
    return FusedLayout(name, applies, split, VERIFIED.get(name, frozenset()) if verified else None)


_BUILT_IN = (
    # OLMo-1 native ff_proj: `x, x_gate = x.chunk(2, dim=-1)`, then act(x_gate) * x -> up comes first
    _layout("olmo1.ff_proj", _is("ffn_gate_up", "ff_proj"), _gate_up_halves(up_first=True), verified=False),
    _layout(
        "experts.gate_up.interleaved_columns", _is("ffn_gate_up", "gate_up_proj"), _gate_up_columns(True)
    ),
    _layout("experts.gate_up.columns", _is("ffn_gate_up", "gate_up_proj"), _gate_up_columns(False)),
    # Phi-3, MoE experts, ModernBERT Wi, JetMoE input_linear: `gate, up = ....chunk(2, dim=-1)`
    _layout("gate_up.chunk", _is("ffn_gate_up"), _gate_up_halves(up_first=False)),
    # torch.nn.MultiheadAttention (_in_projection_packed): equal concatenated thirds
    _layout("torch.in_proj_weight", _is("qkv", "in_proj_weight"), _thirds, verified=False),
    _layout("qkv.thirds", _is("qkv", "wqkv"), _thirds),  # MPT: chunk(3)
    _layout("gpt2.c_attn", _is_gpt2_conv1d, _gpt2_conv1d),
    _layout("gpt_bigcode.c_attn", _is("qkv", "c_attn"), _gpt_bigcode),
    _layout("neox.per_head", _is("qkv", "query_key_value"), _neox),
    _layout("falcon.query_key_value", _is("qkv", "query_key_value"), _falcon),
    _layout("olmo1.att_proj", _is("qkv", "att_proj"), _concat_gqa, verified=False),
    _layout("qkv.concatenated", _is("qkv", "qkv_proj", "qkv"), _concat_gqa),
    _layout("codegen.qkv_proj", _is("qkv", "qkv_proj"), _codegen),
    _layout("mla.kv_a", _is("kv_a"), _mla_kv_a),
    _layout("mla.kv_b", _is("kv_b"), _mla_kv_b),
    _layout("q_gate.per_head", _is("q_gate"), _q_gate),
    _layout("kv.halves", _is("kv"), _kv_halves),
)
for _entry in _BUILT_IN:
    register_layout(_entry, first=False)

"""Fused layouts as a registry: how each family's fused parameter (QKV, gate-up, expert stacks) is cut into its parts,
exactly as that family's forward pass slices it (docs/roles.md).

A layout is a :class:`FusedLayout`: a test on a :class:`LayoutQuery` (the parameter's name, its role, the model type
and config) and a split function. :func:`split_fused` takes the first registered layout whose test passes; a new
family is one :func:`register_layout` call. A fused parameter that no layout claims is not split by a guess: it is
reported whole, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weibull_monitor.models.components import Role
from weibull_monitor.models.config import as_config, config_value, head_counts, model_type
from weibull_monitor.models.naming import strip
from weibull_monitor.models.roles import classify

__all__ = ["FusedLayout", "LayoutQuery", "register_layout", "registered_layouts", "split_fused"]


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
    name: str, weight: torch.Tensor, config: Any = None, *, role: Role | None = None, as_matrix: bool = True
) -> dict[str, torch.Tensor]:
    """Split a fused or stacked parameter into its parts, laid out exactly as the architecture's forward pass slices it.

    Returns ``{component: tensor}`` in nn.Linear orientation [out, in]: ``q``/``k``/``v`` for fused attention,
    ``ffn_gate``/``ffn_up`` for fused gate-up, and ``e<i>.<component>`` for 3-D expert stacks. Contiguous block
    layouts give views sharing the parameter's storage. Per-head interleaved layouts (GPT-NeoX, BLOOM, Falcon,
    GPT-BigCode without MQA) cannot be a 2-D view: ``as_matrix=True`` returns 2-D copies, ``as_matrix=False``
    strided views shaped [heads, head_dim, in] (the same elements, no copy).

    ``role``: the parameter's role as the model's role map gave it (with the user's overrides); classified from
    the name when None. Raises ValueError when the parameter is not fused, when no registered layout claims it,
    or when the config lacks what the layout needs.
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
        for expert in range(weight.shape[0]):
            inner = (
                _split_2d(weight[expert], inner_query, as_matrix)
                if role.component == "ffn_gate_up"
                else {role.component: weight[expert]}
            )
            out.update({f"e{expert}.{k}": v for k, v in inner.items()})
        return out
    return _split_2d(weight, query, as_matrix)


def _inner(role: Role) -> list[str]:
    """The per-expert parts of an expert stack (``e3.ffn_gate`` -> ``ffn_gate``), in order, once each."""
    seen: list[str] = []
    for part in role.parts:
        inner = part.split(".", 1)[1] if "." in part else part
        if inner not in seen:
            seen.append(inner)
    return seen


def _split_2d(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    if weight.ndim != 2:
        raise ValueError(f"{query.name!r}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    for layout in _REGISTRY:
        if layout.applies(query):
            parts = layout.split(weight, query, as_matrix)
            if tuple(parts) != tuple(query.role.parts):
                raise ValueError(
                    f"{query.name!r}: layout {layout.name!r} gave parts {tuple(parts)}, the role expects "
                    f"{query.role.parts}"
                )
            return parts
    if query.last == "query_key_value":
        raise ValueError(
            f"{query.name!r}: query_key_value layouts differ between GPT-NeoX, BLOOM and Falcon; pass a config "
            f"with model_type (got {query.model_type!r})"
        )
    raise ValueError(
        f"{query.name!r}: no split layout known for this fused parameter (register one with "
        "weibull_monitor.models.register_layout)"
    )


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


def per_head_interleaved(
    weight: torch.Tensor, heads: int, head_dim: int, as_matrix: bool
) -> dict[str, torch.Tensor]:
    """Output rows laid out [head, (q|k|v), head_dim]: GPT-NeoX, BLOOM, classic Falcon, GPT-BigCode without MQA."""
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
        heads, kv_heads, head_dim = head_counts(config, cols)
    except ValueError:
        if rows % 3:
            raise ValueError(f"cannot split {rows} fused rows into Q, K, V without a config") from None
        return rows // 3, rows // 3, rows // 3
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


# ---------------------------------------------------------------------------------------------------------------
# The built-in layouts, in the order they are tried


def _gate_up_halves(up_first: bool) -> Callable[[torch.Tensor, LayoutQuery, bool], dict[str, torch.Tensor]]:
    def split(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
        rows = weight.shape[0]
        if rows % 2:
            raise ValueError(f"{query.name!r}: fused gate-up weight has an odd row count {rows}")
        first, second = torch.split(weight, rows // 2, dim=0)
        return {"ffn_gate": second, "ffn_up": first} if up_first else {"ffn_gate": first, "ffn_up": second}

    return split


def _thirds(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    return concat_rows(weight, (weight.shape[0] // 3,) * 3, ("q", "k", "v"))


def _gpt2_conv1d(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    # Conv1D stores [in, out]; the forward splits the output columns into Q, K, V (or K, V for cross-attention).
    keys = query.role.parts
    width = weight.shape[1] // len(keys)
    return {k: weight[:, i * width : (i + 1) * width].T for i, k in enumerate(keys)}


def _is_gpt2_conv1d(query: LayoutQuery) -> bool:
    # GPT-2's Conv1D stores [in, parts * in]; a Linear c_attn (Qwen-1) stores [3 * out, in]: the shape tells them
    # apart when no config names the model
    if query.last != "c_attn":
        return False
    if query.model_type == "gpt2":
        return True
    rows, cols = query.shape
    return query.model_type is None and cols == len(query.role.parts) * rows


def _gpt_bigcode(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    heads, _, head_dim = head_counts(query.config, cols)
    if query.role.parts == ("k", "v"):
        return concat_rows(weight, (rows // 2, rows // 2), ("k", "v"))
    if config_value(query.config, "multi_query") is not False:
        return concat_rows(weight, (heads * head_dim, head_dim, head_dim), ("q", "k", "v"))
    return per_head_interleaved(weight, heads, head_dim, as_matrix)


def _neox_bloom(weight: torch.Tensor, query: LayoutQuery, as_matrix: bool) -> dict[str, torch.Tensor]:
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
    rows, cols = weight.shape
    return concat_rows(weight, _qkv_sizes(query.config, rows, cols), ("q", "k", "v"))


def _is_qkv(query: LayoutQuery, *lasts: str) -> bool:
    return query.role.component == "qkv" and query.last in lasts


_BUILT_IN = (
    # OLMo-1 ff_proj: `x, x_gate = x.chunk(2, dim=-1)`, then act(x_gate) * x -> up comes first
    FusedLayout(
        "olmo1.ff_proj",
        lambda q: q.role.component == "ffn_gate_up" and q.last == "ff_proj",
        _gate_up_halves(up_first=True),
    ),
    # Phi-3, MoE experts: `gate, up = ....chunk(2, dim=-1)`
    FusedLayout(
        "gate_up.chunk", lambda q: q.role.component == "ffn_gate_up", _gate_up_halves(up_first=False)
    ),
    # MultiheadAttention (_in_projection_packed), MPT (chunk(3)), Baichuan: equal concatenated thirds
    FusedLayout("qkv.thirds", lambda q: _is_qkv(q, "in_proj_weight", "wqkv", "w_pack"), _thirds),
    FusedLayout("gpt2.c_attn", _is_gpt2_conv1d, _gpt2_conv1d),
    FusedLayout(
        "gpt_bigcode.c_attn", lambda q: _is_qkv(q, "c_attn") and q.model_type == "gpt_bigcode", _gpt_bigcode
    ),
    FusedLayout("qwen1.c_attn", lambda q: _is_qkv(q, "c_attn") and q.model_type == "qwen", _thirds),
    FusedLayout(
        "gpt_neox.query_key_value",
        lambda q: (
            _is_qkv(q, "query_key_value") and q.model_type in ("gpt_neox", "gpt_neox_japanese", "bloom")
        ),
        _neox_bloom,
    ),
    FusedLayout(
        "falcon.query_key_value",
        lambda q: (
            _is_qkv(q, "query_key_value")
            and q.model_type in ("falcon", "refinedweb", "refinedwebmodel", "rw")
        ),
        _falcon,
    ),
    FusedLayout("qkv.concatenated", lambda q: _is_qkv(q, "qkv_proj", "att_proj", "qkv"), _concat_gqa),
)
for _layout in _BUILT_IN:
    register_layout(_layout, first=False)

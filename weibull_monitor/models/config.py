"""Reading a model's config, whatever form it comes in: a ``PretrainedConfig``, a ``config.json`` dict, a model (its
``.config``) or None. Nested text configs of multimodal models are looked into."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["as_config", "config_value", "head_counts", "is_encoder_decoder", "model_type"]


def as_config(obj: Any) -> Any:
    if obj is None or isinstance(obj, Mapping):
        return obj
    if isinstance(obj, torch.nn.Module):
        return getattr(obj, "config", None)
    return obj


def config_value(config: Any, *keys: str, default: Any = None) -> Any:
    """The first present key among ``keys``, looking into a nested text_config for multimodal configs."""
    config = as_config(config)
    if config is None:
        return default
    for source in (config, _nested(config)):
        if source is None:
            continue
        for key in keys:
            value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
            if value is not None:
                return value
    return default


def _nested(config: Any) -> Any:
    for key in ("text_config", "llm_config"):
        nested = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if nested is not None:
            return nested
    return None


def model_type(config: Any) -> str | None:
    value = config_value(config, "model_type")
    return str(value).lower() if value else None


def is_encoder_decoder(config: Any) -> bool | None:
    config = as_config(config)
    if config is None:
        return None
    value = (
        config.get("is_encoder_decoder")
        if isinstance(config, Mapping)
        else getattr(config, "is_encoder_decoder", None)
    )
    return None if value is None else bool(value)


def head_counts(config: Any, hidden: int | None = None, multi_query: bool = True) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a config; ``multi_query=False`` ignores a multi_query flag."""
    heads = config_value(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    if heads is None:
        raise ValueError(
            "splitting this fused projection needs the number of attention heads: pass the model config"
        )
    heads = int(heads)
    if heads <= 0:
        raise ValueError(f"the config says {heads} attention heads: a fused projection cannot be split by it")
    hidden = hidden or config_value(config, "hidden_size", "n_embd", "d_model")
    head_dim = config_value(config, "head_dim") or (int(hidden) // heads if hidden else None)
    if head_dim is None:
        raise ValueError(
            "splitting this fused projection needs hidden_size or head_dim: pass the model config"
        )
    kv_heads = config_value(config, "num_key_value_heads", "num_kv_heads", "n_kv_heads")
    if multi_query and config_value(config, "multi_query", "multi_query_attention") is True:
        kv_heads = 1
    return heads, int(kv_heads) if kv_heads is not None else heads, int(head_dim)

"""How a model stores its attention's Q and K: fused, multi-head, grouped-query or multi-query.

The paper's Selection class behaves by that kind (docs/roles.md): separate Q/K departs deep, GQA mildly, a fused
W_qkv is transitional.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from weibull_monitor.distributed.placement import global_shape
from weibull_monitor.models.config import as_config, config_value, model_type
from weibull_monitor.models.expectations import selection_expectation
from weibull_monitor.models.naming import CROSS, match_rules, recurrent_layers
from weibull_monitor.models.roles import layer_of

__all__ = ["attention_kind", "selection_expectation_for"]


def attention_kind(model_or_config: Any, names: Iterable[str] | None = None) -> str | None:
    """'fused', 'mha', 'gqa' or 'mqa' for a model or config; None when it cannot be told.

    ``fused`` wins whenever the model stores Q, K and V in one matrix (the paper's "transitional" Selection);
    otherwise the config's key/value head count decides. ``names`` (parameter names) replace the model's own.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = as_config(model_or_config)
    if names is None and model is not None:
        names = [n for n, _ in model.named_parameters()]
    name_list = list(names or [])
    components = {}
    recurrent = recurrent_layers(config) if config is not None else frozenset()
    family = model_type(config)
    for name in name_list:
        component, _ = match_rules(name, family=family)
        if component == "qkv" and not CROSS.search(name) and layer_of(name) not in recurrent:
            return "fused"
        components.setdefault(component, name)
    family = model_type(config)
    if family in ("gpt_neox", "bloom", "falcon", "mpt", "phi3", "gpt2", "phimoe") and not name_list:
        return "fused"
    heads = config_value(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    kv_heads = config_value(
        config, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num"
    )
    if config_value(config, "multi_query", "multi_query_attention") is True:
        kv_heads = 1
    if heads is not None:
        kv_heads = heads if kv_heads is None else kv_heads
        return _kind_from_heads(int(heads), int(kv_heads))
    if model is not None and "q" in components and "k" in components:
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

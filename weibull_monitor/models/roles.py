"""The role map: which layer, component and class every weight matrix of a model belongs to (docs/roles.md).

Everything here is pure: names, shapes and config values in, roles out. Nothing imports transformers; a config may
be a ``PretrainedConfig``, a plain dict (a ``config.json``), a model, or None.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from weibull_monitor.distributed.placement import global_shape
from weibull_monitor.models.components import KLASS_OF_COMPONENT, Role
from weibull_monitor.models.config import is_encoder_decoder, model_type
from weibull_monitor.models.naming import (
    CROSS,
    EXPERT_INDEX,
    EXPERT_STACK,
    LAYER_INDEX,
    NEVER_MATRIX,
    NON_MATRIX,
    ONE_MATRIX_3D,
    STACK_SEGMENT,
    T5_STACK,
    compile_overrides,
    match_rule,
    recurrent_layers,
    strip,
)

__all__ = ["UnknownWeightsWarning", "classify", "fused_components", "fused_inner_components", "layer_of", "model_roles"]


class UnknownWeightsWarning(UserWarning):
    """Raised once per :func:`model_roles` call, listing the 2-D weights no rule recognised (classed ``other``)."""


def layer_of(name: str) -> int | None:
    without_expert = EXPERT_INDEX.sub(".", name)
    found = LAYER_INDEX.search(without_expert)
    return int(found.group(1)) if found else None


def _stack_of(name: str, encoder_decoder: bool | None) -> str | None:
    if CROSS.search(name):
        return "cross"
    if encoder_decoder is False:
        return None
    if encoder_decoder or T5_STACK.search(name):
        found = STACK_SEGMENT.search(name)
        return found.group(1) if found else None
    return None


def _parts_for(component: str, name: str, shape: tuple[int, ...] | None, stacked: bool) -> tuple[str, ...]:
    if stacked:
        n_experts = shape[0] if shape else 0
        inner = fused_inner_components(component, name) or (component,)
        return tuple(f"e{e}.{c}" for e in range(n_experts) for c in inner)
    return fused_inner_components(component, name)


#: In a layer whose token mixer is no softmax attention, what each attention component is.
_IN_RECURRENT_LAYER = {
    "q": "rec_q",
    "k": "rec_k",
    "v": "rec_v",
    "o": "rec_out",
    "qkv": "rec_in",
    "attn_gate": "rec_gate",
    "q_gate": "rec_in",
    "kv": "rec_in",
}


def fused_inner_components(component: str, name: str) -> tuple[str, ...]:
    """The components a fused 2-D matrix splits into (empty for a plain one)."""
    if component == "qkv":
        if CROSS.search(name) and strip(name).endswith("c_attn"):
            return ("k", "v")  # GPT-2 / BigCode cross-attention: query lives in q_attn
        return ("q", "k", "v")
    if component == "ffn_gate_up":
        return ("ffn_gate", "ffn_up")
    if component == "kv_a":
        return ("kv_latent", "k_rope")
    if component in ("kv_b", "kv"):
        return ("k", "v")
    if component == "q_gate":
        return ("q_b", "attn_gate") if strip(name).endswith("q_gate_proj") else ("q", "attn_gate")
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
    context = _Context(config, compile_overrides(overrides), is_encoder_decoder(config))
    return _classify(name, shape, context)[0]


class _Context:
    """What classification reads besides the name, computed once per model: overrides, the family, hybrid layers."""

    def __init__(self, config: Any, compiled: list, encoder_decoder: bool | None) -> None:
        self.config = config
        self.compiled = compiled
        self.encoder_decoder = encoder_decoder
        self.family = model_type(config)
        self.recurrent = recurrent_layers(config) if config is not None else frozenset()


def _classify(name: str, shape: Iterable[int] | None, context: _Context) -> tuple[Role | None, bool]:
    dims = tuple(int(d) for d in shape) if shape is not None else None
    stripped = strip(name)
    overridden = any(p.search(name) for p, _ in context.compiled)
    if not overridden and NEVER_MATRIX.search(stripped):
        return None, True  # biases stored as rows, SSM decay tables: never a matrix of weights
    stacked = bool(EXPERT_STACK.search(stripped))
    if dims is not None:
        if stacked and len(dims) != 3:
            stacked = False
        one_matrix = len(dims) == 3 and not stacked and bool(ONE_MATRIX_3D.search(stripped))
        if not stacked and len(dims) != 2 and not one_matrix:
            return None, True
    elif not overridden and NON_MATRIX.search(name):
        return None, True  # no shape given: judge by name (norms, biases, class tokens)
    component, qualifier, recognised = match_rule(name, context.compiled, context.family)
    # embeddings, heads and recognised head-side matrices (classifiers, projectors) belong to no layer
    layerless = component in ("embed", "lm_head") or (component == "other" and qualifier is not None)
    layer = None if layerless else layer_of(name)
    if layer is not None and layer in context.recurrent and not overridden:
        component = _IN_RECURRENT_LAYER.get(component, component)
    expert_found = EXPERT_INDEX.search(name)
    expert = int(expert_found.group(1)) if expert_found else None
    role = Role(
        layer=layer,
        component=component,
        klass=KLASS_OF_COMPONENT[component],
        expert=expert,
        stack=_stack_of(name, context.encoder_decoder),
        parts=_parts_for(component, name, dims, stacked),
        stacked=stacked,
        qualifier=qualifier,
    )
    return role, recognised


def fused_components(role: Role) -> tuple[str, ...]:
    """The keys :func:`split_fused` returns for a parameter of this role (empty when it is not fused or stacked)."""
    return role.parts


def model_roles(model: torch.nn.Module, overrides: Any = None) -> dict[str, Role]:
    """Roles of every weight matrix of ``model`` (2-D parameters and 3-D expert stacks), keyed by parameter name.

    Reads ``model.config`` when there is one. Tied weights (an lm_head that is the embedding) appear once, under
    the first name ``named_parameters`` gives them. Unrecognised 2-D weights are classed ``other`` and listed in
    one :class:`UnknownWeightsWarning`. ``overrides`` (regex -> component) win over the built-in rules.
    """
    config = getattr(model, "config", None)
    names = [name for name, _ in model.named_parameters()]
    encoder_decoder = is_encoder_decoder(config)
    if encoder_decoder is None:
        segments = {m.group(1) for n in names for m in [STACK_SEGMENT.search(n)] if m}
        encoder_decoder = segments == {"encoder", "decoder"}
    context = _Context(config, compile_overrides(overrides), encoder_decoder)
    roles: dict[str, Role] = {}
    unknown: list[str] = []
    for name, param in model.named_parameters():  # deduplicates tied parameters
        role, recognised = _classify(name, global_shape(param), context)
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

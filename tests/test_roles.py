"""Role map: every family of issue 3 built from its transformers config class (tiny sizes, random init, no download).

Each case states by hand how many matrices of each component the model holds (L layers -> L per component), so a
naming rule that breaks shows up as a count that moves, and asserts that no projection falls into ``other``.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import transformers as tf

from weibull_monitor import roles
from weibull_monitor.roles import (
    COMPONENTS,
    Role,
    UnknownWeightsWarning,
    attention_kind,
    classify,
    model_roles,
    split_key,
    view_role,
)

L = 2  # layers in every tiny model
SMALL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=L,
    num_attention_heads=4,
    vocab_size=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
DECODER_FFN_GATED = {"q": L, "k": L, "v": L, "o": L, "ffn_gate": L, "ffn_up": L, "ffn_down": L}
SEPARATE_ATTN_PLAIN_FFN = {"q": L, "k": L, "v": L, "o": L, "ffn_up": L, "ffn_down": L}
FUSED_ATTN_PLAIN_FFN = {"qkv": L, "o": L, "ffn_up": L, "ffn_down": L}

# family -> (config class, model class, config overrides, expected component counts, attention kind)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2),
        {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1},
        "gqa",
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2),
        {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1},
        "gqa",
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=False),
        {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1},
        "gqa",
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
        {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1},
        "gqa",
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(num_key_value_heads=1, head_dim=8),
        {**DECODER_FFN_GATED, "embed": 1},
        "mqa",
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_key_value_heads=2, head_dim=8),
        {**DECODER_FFN_GATED, "embed": 1},
        "gqa",
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=8),
        {**DECODER_FFN_GATED, "embed": 1},
        "gqa",
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 1, "lm_head": 1},
        "mha",
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(num_key_value_heads=2),
        {"qkv": L, "o": L, "ffn_gate_up": L, "ffn_down": L, "embed": 1, "lm_head": 1},
        "fused",
    ),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(), {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1}, "mha"),
    "olmo2": (
        "Olmo2Config",
        "Olmo2ForCausalLM",
        dict(),
        {**DECODER_FFN_GATED, "embed": 1, "lm_head": 1},
        "mha",
    ),
    "starcoder2": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        dict(num_key_value_heads=2),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 1},
        "gqa",
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=L, n_head=4),
        {**FUSED_ATTN_PLAIN_FFN, "embed": 2},
        "fused",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(),
        {**FUSED_ATTN_PLAIN_FFN, "embed": 1, "lm_head": 1},
        "fused",
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=32, n_layer=L, n_head=4, rotary_dim=4),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 1, "lm_head": 1},
        "mha",
    ),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(), {**FUSED_ATTN_PLAIN_FFN, "embed": 1}, "fused"),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(n_layer=L, n_head=4),
        {**FUSED_ATTN_PLAIN_FFN, "embed": 1},
        "fused",
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(ffn_dim=48, word_embed_proj_dim=32),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 2},
        "mha",
    ),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        dict(),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 3, "other": 1},
        "mha",
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaForMaskedLM",
        dict(),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 3, "other": 1},
        "mha",
    ),
    "deberta_v2": (
        "DebertaV2Config",
        "DebertaV2ForMaskedLM",
        dict(),
        {**SEPARATE_ATTN_PLAIN_FFN, "embed": 2, "other": 1},
        "mha",
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(image_size=16, patch_size=8),
        {**SEPARATE_ATTN_PLAIN_FFN, "other": 1},
        "mha",
    ),
}


def build(family: str) -> torch.nn.Module:
    config_class, model_class, overrides, _, _ = FAMILIES[family]
    config = getattr(tf, config_class)(**{**SMALL, **overrides})
    torch.manual_seed(0)
    return getattr(tf, model_class)(config)


def component_counts(role_map: dict[str, Role]) -> dict[str, int]:
    return dict(Counter(role.component for role in role_map.values()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_component_counts_and_no_projection_in_other(family):
    model = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UnknownWeightsWarning
        )  # every 2-D weight of these families is recognised
        role_map = model_roles(model)
    expected = FAMILIES[family][3]
    assert component_counts(role_map) == expected
    # the only "other" matrices are heads (classifier / MLM transform), never a block projection
    for name, role in role_map.items():
        if role.component == "other":
            assert role.layer is None, name
        if role.component in ("q", "k", "v", "o", "qkv") or role.component.startswith("ffn"):
            assert role.layer in range(L), name
    # every 2-D parameter got a role, and nothing else did
    two_d = {n for n, p in model.named_parameters() if p.ndim == 2}
    assert set(role_map) == two_d
    assert attention_kind(model) == FAMILIES[family][4]


def test_classes_follow_components():
    role_map = model_roles(build("llama"))
    by_component = {role.component: role.klass for role in role_map.values()}
    assert by_component == {
        "embed": "other",
        "q": "selection",
        "k": "selection",
        "v": "value",
        "o": "transmission",
        "ffn_gate": "transmission",
        "ffn_up": "transmission",
        "ffn_down": "transmission",
        "lm_head": "other",
    }
    assert role_map["model.layers.1.self_attn.k_proj.weight"] == Role(
        layer=1, component="k", klass="selection"
    )


def test_classify_names_without_a_model():
    assert classify("gpt_neox.layers.3.attention.dense.weight") == Role(3, "o", "transmission")
    assert classify("transformer.h.5.attn.c_attn.weight").component == "qkv"
    assert classify("transformer.h.5.attn.c_attn.weight").klass == "mixed"
    assert classify("transformer.h.5.mlp.c_proj.weight") == Role(5, "ffn_down", "transmission")
    assert classify("bert.encoder.layer.2.output.dense.weight").component == "ffn_down"
    assert classify("bert.encoder.layer.2.attention.output.dense.weight").component == "o"
    assert classify("model.layers.0.input_layernorm.weight") is None
    assert classify("model.layers.0.self_attn.q_proj.bias") is None
    assert classify("model.layers.0.self_attn.q_proj.weight", shape=(32,)) is None
    assert classify("vit.embeddings.patch_embeddings.projection.weight", shape=(32, 3, 8, 8)) is None


def test_tied_weights_reported_once():
    model = build("gpt2")  # lm_head.weight is transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    role_map = model_roles(model)
    assert "transformer.wte.weight" in role_map and "lm_head.weight" not in role_map
    assert sum(role.component == "embed" for role in role_map.values()) == 2  # wte, wpe


def test_split_key_and_view_role():
    parent = classify("gpt_neox.layers.1.attention.query_key_value.weight", shape=(96, 32))
    assert roles.fused_components(parent) == ("q", "k", "v")
    assert split_key("gpt_neox.layers.1.attention.query_key_value.weight", "k") == (
        "gpt_neox.layers.1.attention.query_key_value.weight[k]"
    )
    view = view_role("gpt_neox.layers.1.attention.query_key_value.weight", parent, "k")
    assert view == Role(
        1, "k", "selection", fused_parent="gpt_neox.layers.1.attention.query_key_value.weight"
    )
    assert set(COMPONENTS) >= {view.component, parent.component}

"""Role map: every family docs/roles.md lists, built from its transformers config class (tiny sizes, random init, no download).

Each case states by hand how many matrices of each component the model holds (L layers -> L per component), so a
naming rule that breaks shows up as a count that moves, and asserts that no projection falls into ``other``.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import transformers as tf

from weibull_monitor import models as roles
from weibull_monitor.models import (
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


# ---------------------------------------------------------------------------------------------------------------
# Mixture of experts: 3-D expert stacks (transformers 5.x) split per expert; routers have their own component.
MOE = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_key_value_heads=2, num_local_experts=3),
        3,
        0,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_key_value_heads=2, num_experts=3, moe_intermediate_size=16, shared_expert_intermediate_size=24
        ),
        3,
        1,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_key_value_heads=2, num_experts=3, moe_intermediate_size=16),
        3,
        0,
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, num_experts_per_tok=2), 3, 0),
}


def expanded_counts(role_map: dict[str, Role]) -> Counter:
    """(component, expert is set) counts over what a monitor fits: every matrix and every split part."""
    counts: Counter = Counter()
    for name, role in role_map.items():
        if not role.stacked:
            counts[role.component, role.expert is not None] += 1
        for part in roles.fused_components(role):
            view = view_role(name, role, part)
            counts[view.component, view.expert is not None] += 1
    return counts


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_experts_routers_and_shared_experts(family):
    config_class, model_class, overrides, experts, shared = MOE[family]
    config = getattr(tf, config_class)(**{**SMALL, "num_experts_per_tok": 2, **overrides})
    model = getattr(tf, model_class)(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWeightsWarning)
        role_map = model_roles(model)
    counts = expanded_counts(role_map)
    assert counts["ffn_gate", True] == L * experts
    assert counts["ffn_up", True] == L * experts
    assert counts["ffn_down", True] == L * experts
    assert counts["router", False] == L * (1 + shared)  # Qwen2-MoE adds a shared_expert_gate per layer
    for component in ("ffn_gate", "ffn_up", "ffn_down"):
        assert counts[component, False] == L * shared  # the shared expert's dense FFN
    for component in ("q", "k", "v", "o"):
        assert counts[component, False] == L
    assert counts["other", False] == 0
    stacks = [r for r in role_map.values() if r.stacked]
    assert {r.component for r in stacks} == {"ffn_gate_up", "ffn_down"} and all(
        r.expert is None for r in stacks
    )


def test_legacy_per_expert_names():
    # Mixtral checkpoints before transformers 5 store one 2-D matrix per expert (w1 gate, w3 up, w2 down).
    role = classify("model.layers.7.block_sparse_moe.experts.5.w1.weight", (14336, 4096))
    assert role == Role(7, "ffn_gate", "transmission", expert=5)
    assert (
        classify("model.layers.7.block_sparse_moe.experts.5.w3.weight", (14336, 4096)).component == "ffn_up"
    )
    assert (
        classify("model.layers.7.block_sparse_moe.experts.5.w2.weight", (4096, 14336)).component == "ffn_down"
    )
    assert classify("model.layers.7.block_sparse_moe.gate.weight", (8, 4096)) == Role(7, "router", "other")
    assert classify("model.layers.2.mlp.experts.11.gate_proj.weight", (16, 32)).expert == 11


# ---------------------------------------------------------------------------------------------------------------
def test_t5_encoder_decoder_and_cross_stacks():
    config = tf.T5Config(d_model=32, d_ff=48, d_kv=8, num_layers=L, num_heads=4, vocab_size=64)
    model = tf.T5ForConditionalGeneration(config)
    role_map = model_roles(model)
    counts = Counter((r.component, r.stack) for r in role_map.values())
    for component in ("q", "k", "v", "o"):
        for stack in ("encoder", "decoder", "cross"):
            assert counts[component, stack] == L, (component, stack)
    for stack in ("encoder", "decoder"):
        assert counts["ffn_up", stack] == L  # DenseReluDense.wi
        assert counts["ffn_down", stack] == L  # DenseReluDense.wo
    assert counts["ffn_up", "cross"] == 0
    assert not any(r.component == "other" for r in role_map.values())
    cross_q = role_map["decoder.block.1.layer.1.EncDecAttention.q.weight"]
    assert cross_q == Role(1, "q", "selection", stack="cross")
    # gated T5 (v1.1, flan): wi_0 is the gate, wi_1 the up projection
    assert (
        classify("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", config=config).component == "ffn_gate"
    )
    assert classify("encoder.block.0.layer.1.DenseReluDense.wi_1.weight", config=config).component == "ffn_up"
    # a config.json dict tells the stacks too, and a decoder-only model never gets a stack
    assert (
        classify("decoder.block.0.layer.0.SelfAttention.k.weight", config=config.to_dict()).stack == "decoder"
    )
    assert (
        classify("model.decoder.layers.0.self_attn.k_proj.weight", config={"is_encoder_decoder": False}).stack
        is None
    )


def test_olmo1_native_names():
    shapes = {
        "model.transformer.wte.weight": (64, 32),
        "model.transformer.blocks.0.att_proj.weight": (96, 32),
        "model.transformer.blocks.0.attn_out.weight": (32, 32),
        "model.transformer.blocks.0.ff_proj.weight": (96, 32),
        "model.transformer.blocks.0.ff_out.weight": (32, 48),
        "model.transformer.ff_out.weight": (64, 32),  # the untied output head
    }
    got = {name: classify(name, shape) for name, shape in shapes.items()}
    assert [(r.layer, r.component, r.klass) for r in got.values()] == [
        (None, "embed", "other"),
        (0, "qkv", "mixed"),
        (0, "o", "transmission"),
        (0, "ffn_gate_up", "transmission"),
        (0, "ffn_down", "transmission"),
        (None, "lm_head", "other"),
    ]
    assert roles.fused_components(got["model.transformer.blocks.0.ff_proj.weight"]) == ("ffn_gate", "ffn_up")
    assert attention_kind({"model_type": "olmo", "n_heads": 4}, list(shapes)) == "fused"


def test_torch_multihead_attention_and_transformer_layers():
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), L, enable_nested_tensor=False
    )
    role_map = model_roles(model)
    assert component_counts(role_map) == {"qkv": L, "o": L, "ffn_up": L, "ffn_down": L}
    assert role_map["layers.1.self_attn.in_proj_weight"].parts == ("q", "k", "v")
    assert attention_kind(model) == "fused"


# ---------------------------------------------------------------------------------------------------------------
class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"mixer_a": torch.nn.Linear(8, 8)}) for _ in range(2)
        )
        self.head = torch.nn.Linear(8, 3)


def test_unknown_weights_are_other_and_listed_once():
    with pytest.warns(UnknownWeightsWarning) as caught:
        role_map = model_roles(_Custom())
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("blocks.0.mixer_a.weight", "blocks.1.mixer_a.weight", "head.weight"):
        assert name in message and role_map[name].klass == "other"
    assert role_map["blocks.1.mixer_a.weight"].layer == 1


def test_overrides_win_over_built_in_rules():
    overrides = {r"mixer_a": "q", r"^head\.": "lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWeightsWarning)
        role_map = model_roles(_Custom(), overrides=overrides)
    assert role_map["blocks.0.mixer_a.weight"] == Role(0, "q", "selection")
    assert role_map["head.weight"].component == "lm_head"
    # an override beats a built-in rule, and a bad override is a clear error
    assert (
        classify("model.layers.0.mlp.up_proj.weight", overrides={"up_proj": "ffn_gate"}).component
        == "ffn_gate"
    )
    with pytest.raises(ValueError, match="not one of"):
        model_roles(_Custom(), overrides={"head": "attention"})
    with pytest.raises(ValueError, match="regular expression"):
        model_roles(_Custom(), overrides={"(": "q"})


def test_attention_kind_from_configs_and_dicts():
    assert attention_kind(tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=8)) == "mha"
    assert attention_kind(tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=2)) == "gqa"
    assert (
        attention_kind({"model_type": "gemma", "num_attention_heads": 8, "num_key_value_heads": 1}) == "mqa"
    )
    assert attention_kind({"model_type": "gpt_neox", "num_attention_heads": 8}) == "fused"
    assert (
        attention_kind({"model_type": "llama", "num_attention_heads": 8}) == "mha"
    )  # no KV count: one per head
    assert attention_kind(None) is None
    assert (
        roles.selection_expectation_for(tf.LlamaConfig(num_attention_heads=8, num_key_value_heads=2))
        == "mild"
    )
    assert (
        roles.selection_expectation_for({"model_type": "gpt_neox", "num_attention_heads": 8})
        == "transitional"
    )
    assert roles.selection_expectation_for(tf.OlmoConfig(num_attention_heads=4)) == "deep"


def test_wrapper_prefixes_and_peft_names():
    # DDP (module.), torch.compile (_orig_mod.), FSDP1 wrappers and PEFT LoRA keep the underlying role
    for name in (
        "module.model.layers.3.self_attn.k_proj.weight",
        "_orig_mod.model.layers.3.self_attn.k_proj.weight",
        "_fsdp_wrapped_module.model.layers.3._fsdp_wrapped_module.self_attn.k_proj.weight",
        "base_model.model.model.layers.3.self_attn.k_proj.base_layer.weight",
    ):
        assert classify(name, (16, 32)) == Role(3, "k", "selection"), name
    lora = classify("base_model.model.model.layers.3.self_attn.k_proj.lora_A.default.weight", (8, 32))
    assert lora.component == "other" and lora.layer == 3


def test_gpt2_cross_attention_names_and_split():
    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, add_cross_attention=True)
    model = tf.GPT2LMHeadModel(config)
    role_map = model_roles(model)
    kv = role_map["transformer.h.0.crossattention.c_attn.weight"]
    assert (kv.component, kv.stack, kv.parts) == ("qkv", "cross", ("k", "v"))
    assert role_map["transformer.h.0.crossattention.q_attn.weight"] == Role(
        0, "q", "selection", stack="cross"
    )
    assert role_map["transformer.h.0.crossattention.c_proj.weight"] == Role(
        0, "o", "transmission", stack="cross"
    )
    weight = model.transformer.h[
        0
    ].crossattention.c_attn.weight  # Conv1D [in, 2E]: forward splits K, V by columns
    parts = roles.split_fused("transformer.h.0.crossattention.c_attn.weight", weight, config)
    assert torch.equal(parts["k"], weight[:, :32].T) and torch.equal(parts["v"], weight[:, 32:].T)
    assert attention_kind(model) == "fused"  # self-attention is the fused c_attn


def test_original_llama_and_distilbert_names():
    meta = {
        "tok_embeddings.weight": ("embed", None),
        "layers.4.attention.wq.weight": ("q", 4),
        "layers.4.attention.wk.weight": ("k", 4),
        "layers.4.attention.wv.weight": ("v", 4),
        "layers.4.attention.wo.weight": ("o", 4),
        "layers.4.feed_forward.w1.weight": ("ffn_gate", 4),
        "layers.4.feed_forward.w3.weight": ("ffn_up", 4),
        "layers.4.feed_forward.w2.weight": ("ffn_down", 4),
        "output.weight": ("lm_head", None),
        "distilbert.transformer.layer.1.attention.q_lin.weight": ("q", 1),
        "distilbert.transformer.layer.1.attention.out_lin.weight": ("o", 1),
        "distilbert.transformer.layer.1.ffn.lin1.weight": ("ffn_up", 1),
        "distilbert.transformer.layer.1.ffn.lin2.weight": ("ffn_down", 1),
    }
    for name, (component, layer) in meta.items():
        role = classify(name, (8, 8))
        assert (role.component, role.layer) == (component, layer), name
    assert classify("layers.4.attention_norm.weight") is None

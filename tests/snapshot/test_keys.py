"""Metric keys come from roles, not names: the same matrix of two families, or of one model wrapped or not, gets the
same dashboard key (docs/roles.md, "Stable metric keys")."""

from __future__ import annotations

import pytest

from weibull_monitor.models import classify, model_roles
from weibull_monitor.snapshot import keys


def keyed(names_and_shapes, config=None):
    roles = {n: classify(n, s, config) for n, s in names_and_shapes}
    return keys.matrix_metric_keys({n: r for n, r in roles.items() if r is not None})


def test_routers_embeddings_and_shared_experts_line_up_across_families():
    mixtral = keyed([("model.layers.0.mlp.gate.weight", (8, 64))])
    qwen2_moe = keyed(
        [
            ("model.layers.0.mlp.gate.weight", (8, 64)),
            ("model.layers.0.mlp.shared_expert_gate.weight", (1, 64)),
            ("model.layers.0.mlp.shared_expert.up_proj.weight", (96, 64)),
            ("model.layers.0.mlp.experts.3.up_proj.weight", (96, 64)),
        ]
    )
    assert (
        mixtral["model.layers.0.mlp.gate.weight"]
        == qwen2_moe["model.layers.0.mlp.gate.weight"]
        == "weibull/k/L0/router"
    )
    assert qwen2_moe["model.layers.0.mlp.shared_expert_gate.weight"] == "weibull/k/L0/router/shared"
    assert qwen2_moe["model.layers.0.mlp.shared_expert.up_proj.weight"] == "weibull/k/L0/ffn_up/shared"
    assert qwen2_moe["model.layers.0.mlp.experts.3.up_proj.weight"] == "weibull/k/L0/ffn_up/E3"
    llama = keyed([("model.embed_tokens.weight", (128, 64))])
    gpt2 = keyed([("transformer.wte.weight", (128, 64)), ("transformer.wpe.weight", (64, 64))])
    assert llama["model.embed_tokens.weight"] == gpt2["transformer.wte.weight"] == "weibull/k/embed"
    assert gpt2["transformer.wpe.weight"] == "weibull/k/embed/position"


def test_mla_and_recurrent_parts_have_their_own_keys():
    found = keyed(
        [
            ("model.layers.1.self_attn.q_a_proj.weight", (32, 64)),
            ("model.layers.1.self_attn.q_b_proj.weight", (96, 32)),
            ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", (24, 64)),
            ("model.layers.1.self_attn.kv_b_proj.weight", (96, 16)),
            ("backbone.layers.1.mixer.in_proj.weight", (256, 64)),
            ("backbone.layers.1.mixer.out_proj.weight", (64, 128)),
        ]
    )
    assert set(found.values()) == {
        "weibull/k/L1/q_a",
        "weibull/k/L1/q_b",
        "weibull/k/L1/kv_a",
        "weibull/k/L1/kv_b",
        "weibull/k/L1/rec_in",
        "weibull/k/L1/rec_out",
    }


def test_wrapper_prefixes_change_no_key():
    plain = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mystery.weight"]
    for prefix in ("_orig_mod.", "module.", "base_model.model.", "_fsdp_wrapped_module."):
        wrapped = keyed([(prefix + n, (64, 64)) for n in plain])
        assert sorted(wrapped.values()) == sorted(keyed([(n, (64, 64)) for n in plain]).values())


def test_recognised_duplicates_get_a_rank_and_unknown_ones_their_name():
    found = keyed(
        [
            (
                "model.layers.0.self_attn.0.q_a_proj.weight",
                (32, 64),
            ),  # LongCat: two attention blocks per layer
            ("model.layers.0.self_attn.1.q_a_proj.weight", (32, 64)),
            ("model.layers.0.foo.weight", (8, 8)),
            ("model.layers.0.bar.weight", (8, 8)),
        ]
    )
    assert found["model.layers.0.self_attn.0.q_a_proj.weight"] == "weibull/k/L0/q_a/0"
    assert found["model.layers.0.self_attn.1.q_a_proj.weight"] == "weibull/k/L0/q_a/1"
    assert found["model.layers.0.foo.weight"] == "weibull/k/L0/other/model.layers.0.foo.weight"


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe", "deepseek_v3", "qwen3_next", "jamba"])
def test_no_key_of_a_real_family_depends_on_a_parameter_name(family):
    pytest.importorskip("transformers")
    from weibull_monitor.models.sweep.run import build_family

    model, _ = build_family(family)
    found = keys.matrix_metric_keys(model_roles(model))
    assert len(set(found.values())) == len(found)
    assert not [k for k in found.values() if "." in k.removeprefix("weibull/k/")], found

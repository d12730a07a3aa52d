"""split_fused against the real forward passes: the parts must be exactly what each architecture's attention sees.

Method: build the fused weight from known separate blocks in the layout the forward pass slices, check that
split_fused returns those blocks bit-for-bit (and as views where the layout allows), then run the real module of
the installed transformers and capture the Q, K, V it hands to its attention kernel; they must equal the separate
projections of the same input. Positions are all 0, so rotary embeddings are the identity (cos 1, sin 0).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface

from weibull_monitor.models import classify, split_fused

CAPTURE = "weibull_roles_capture"


class _Captured(Exception):
    pass


_seen: dict[str, torch.Tensor] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    _seen.update(q=query, k=key, v=value)
    raise _Captured


AttentionInterface.register(CAPTURE, _capture_attention)


def capture_qkv(
    model: torch.nn.Module, attention: torch.nn.Module, seq: int = 5
) -> tuple[torch.Tensor, dict]:
    """Run ``model`` until ``attention`` calls its kernel: (attention input hidden states, {q,k,v} [B, H, T, D])."""
    model.config._attn_implementation = CAPTURE
    inputs: dict[str, torch.Tensor] = {}

    def grab(_module, args, kwargs):
        inputs["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(3, model.config.vocab_size, (2, seq))
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model(input_ids=ids, position_ids=torch.zeros_like(ids))
    finally:
        handle.remove()
    return inputs["x"], dict(_seen)


def heads_of(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x @ weight.T as [B, heads, T, head_dim], the shape attention kernels receive."""
    y = torch.nn.functional.linear(x, weight)
    return y.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def blocks(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


def assert_views(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
    for key, part in parts.items():
        assert part.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr(), key


def assert_bitwise(parts: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(parts) == set(expected)
    for key in expected:
        assert parts[key].shape == expected[key].shape, key
        assert torch.equal(parts[key], expected[key]), key


# ---------------------------------------------------------------------------------------------------------------
def test_gpt_neox_query_key_value_is_interleaved_per_head():
    config = tf.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        rotary_pct=1.0,
    )
    model = tf.GPTNeoXForCausalLM(config).double()
    H, D, E = 4, 8, 32
    q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
    # rows [head, (q|k|v), head_dim]: the forward views the output as (-1, 3*head_size) per head, then chunks 3
    fused = torch.stack([q.view(H, D, E), k.view(H, D, E), v.view(H, D, E)], dim=1).reshape(3 * E, E)
    attention = model.gpt_neox.layers[0].attention
    with torch.no_grad():
        attention.query_key_value.weight.copy_(fused)
        attention.query_key_value.bias.zero_()
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    weight = attention.query_key_value.weight
    parts = split_fused(name, weight, config)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    strided = split_fused(name, weight, config, as_matrix=False)  # no copy: [heads, head_dim, in] views
    assert_views(strided, weight)
    assert_bitwise({c: t.reshape(E, E) for c, t in strided.items()}, {"q": q, "k": k, "v": v})
    x, seen = capture_qkv(model, attention)
    for c in "qkv":
        torch.testing.assert_close(seen[c], heads_of(x, parts[c], D))


def test_gpt2_c_attn_conv1d_is_transposed_and_split_by_columns():
    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)
    model = tf.GPT2LMHeadModel(config).double()
    E, D = 32, 8
    q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)  # nn.Linear orientation [out, in]
    fused = torch.cat([q, k, v], dim=0).T.contiguous()  # Conv1D stores [in, out]
    attention = model.transformer.h[0].attn
    with torch.no_grad():
        attention.c_attn.weight.copy_(fused)
        attention.c_attn.bias.zero_()
    name = "transformer.h.0.attn.c_attn.weight"
    weight = attention.c_attn.weight
    for cfg in (config, config.to_dict(), None):  # without a config the Conv1D shape [in, 3*in] still tells
        parts = split_fused(name, weight, cfg)
        assert_bitwise(parts, {"q": q, "k": k, "v": v})
        assert_views(parts, weight)
    x, seen = capture_qkv(model, attention)
    for c in "qkv":
        torch.testing.assert_close(seen[c], heads_of(x, parts[c], D))


def test_split_refuses_plain_and_ambiguous_parameters():
    with pytest.raises(ValueError, match="not a fused"):
        split_fused("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 4), None)
    with pytest.raises(ValueError, match="no layout verified for model type None"):
        split_fused("h.0.self_attention.query_key_value.weight", torch.zeros(12, 4), None)
    assert classify("h.0.self_attention.query_key_value.weight").component == "qkv"


def capture_method(model: torch.nn.Module, attention: torch.nn.Module, method: str, seq: int = 5):
    """Run ``model`` until ``attention.<method>`` returns (its real code runs): (attention input, its result)."""
    inputs: dict[str, object] = {}
    original = getattr(attention, method)

    def wrapped(*args, **kwargs):
        inputs["out"] = original(*args, **kwargs)
        raise _Captured

    def grab(_module, args, kwargs):
        inputs["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    setattr(attention, method, wrapped)
    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(3, model.config.vocab_size, (2, seq))
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model(input_ids=ids, position_ids=torch.zeros_like(ids))
    finally:
        handle.remove()
        delattr(attention, method)
    return inputs["x"], inputs["out"]


def install(linear: torch.nn.Module, fused: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        linear.weight.copy_(fused)
        if getattr(linear, "bias", None) is not None:
            linear.bias.zero_()
    return linear.weight


def test_bloom_query_key_value_is_interleaved_per_head():
    config = tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=64)
    model = tf.BloomForCausalLM(config).double()
    H, D, E = 4, 8, 32
    q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
    fused = torch.stack([q.view(H, D, E), k.view(H, D, E), v.view(H, D, E)], dim=1).reshape(3 * E, E)
    attention = model.transformer.h[0].self_attention
    weight = install(attention.query_key_value, fused)
    parts = split_fused("transformer.h.0.self_attention.query_key_value.weight", weight, config.to_dict())
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    assert_views(
        split_fused("transformer.h.0.self_attention.query_key_value.weight", weight, config, as_matrix=False),
        weight,
    )
    x, (q_seen, k_seen, v_seen) = capture_method(model, attention, "_reshape")
    for c, seen in zip("qkv", (q_seen, k_seen, v_seen)):
        torch.testing.assert_close(seen, heads_of(x, parts[c], D))


FALCON_LAYOUTS = {
    # name: (config overrides, kv heads stored, fused rows builder)
    "classic_mha": dict(new_decoder_architecture=False, multi_query=False),
    "multi_query": dict(new_decoder_architecture=False, multi_query=True),
    "grouped_gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
}


@pytest.mark.parametrize("layout", sorted(FALCON_LAYOUTS))
def test_falcon_query_key_value_layouts(layout):
    config = tf.FalconConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64, **FALCON_LAYOUTS[layout]
    )
    model = tf.FalconForCausalLM(config).double()
    H, D, E = 4, 8, 32
    if layout == "classic_mha":
        q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
        fused = torch.stack([q.view(H, D, E), k.view(H, D, E), v.view(H, D, E)], dim=1).reshape(3 * E, E)
        kv_heads, views = H, False
    elif layout == "multi_query":
        q, k, v = blocks(E, E, 1), blocks(D, E, 2), blocks(D, E, 3)
        fused = torch.cat([q, k, v])  # [q heads..., k, v]: the forward views (num_heads + 2, head_dim)
        kv_heads, views = 1, True
    else:
        G = 2
        q, k, v = blocks(E, E, 1), blocks(G * D, E, 2), blocks(G * D, E, 3)
        # [group, (q_1..q_n, k, v), head_dim]: the forward views (-1, heads // kv_heads + 2, head_dim)
        fused = torch.cat([q.view(G, H // G, D, E), k.view(G, 1, D, E), v.view(G, 1, D, E)], dim=1).reshape(
            -1, E
        )
        kv_heads, views = G, False
    attention = model.transformer.h[0].self_attention
    weight = install(attention.query_key_value, fused)
    name = "transformer.h.0.self_attention.query_key_value.weight"
    parts = split_fused(name, weight, config)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    if views:
        assert_views(parts, weight)
    assert_views(split_fused(name, weight, config, as_matrix=False), weight)
    x, (q_seen, k_seen, v_seen) = capture_method(model, attention, "_split_heads")
    torch.testing.assert_close(q_seen, heads_of(x, parts["q"], D).transpose(1, 2))
    for c, seen in (("k", k_seen), ("v", v_seen)):
        expected = heads_of(x, parts[c], D).transpose(1, 2)  # [B, T, kv_heads, D]
        if layout == "grouped_gqa":  # the forward broadcasts each group's K/V to its query heads
            expected = expected.unsqueeze(3).expand(-1, -1, kv_heads, H // kv_heads, D).flatten(2, 3)
        torch.testing.assert_close(seen, expected)


def test_phi3_qkv_proj_gqa_and_gate_up_proj():
    config = tf.Phi3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = tf.Phi3ForCausalLM(config).double()
    D, E, F = 8, 32, 48
    q, k, v = blocks(E, E, 1), blocks(2 * D, E, 2), blocks(2 * D, E, 3)
    layer = model.model.layers[0]
    weight = install(layer.self_attn.qkv_proj, torch.cat([q, k, v]))  # forward slices [:q], [q:q+kv], [q+kv:]
    parts = split_fused("model.layers.0.self_attn.qkv_proj.weight", weight, config)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    assert_views(parts, weight)
    x, seen = capture_qkv(model, layer.self_attn)
    for c in "qkv":
        torch.testing.assert_close(seen[c], heads_of(x, parts[c], D))

    gate, up = blocks(F, E, 4), blocks(F, E, 5)
    gate_up = install(layer.mlp.gate_up_proj, torch.cat([gate, up]))  # forward: gate, up = chunk(2, dim=-1)
    ffn = split_fused("model.layers.0.mlp.gate_up_proj.weight", gate_up, config)
    assert_bitwise(ffn, {"ffn_gate": gate, "ffn_up": up})
    assert_views(ffn, gate_up)
    h = blocks(7, E, 6)
    manual = layer.mlp.down_proj(layer.mlp.activation_fn(h @ ffn["ffn_gate"].T) * (h @ ffn["ffn_up"].T))
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(h), manual)


@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_c_attn_mqa_concatenated_and_mha_interleaved(multi_query):
    config = tf.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64, multi_query=multi_query)
    model = tf.GPTBigCodeForCausalLM(config).double()
    H, D, E = 4, 8, 32
    if multi_query:
        q, k, v = blocks(E, E, 1), blocks(D, E, 2), blocks(D, E, 3)
        fused = torch.cat([q, k, v])
    else:
        q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
        fused = torch.stack([q.view(H, D, E), k.view(H, D, E), v.view(H, D, E)], dim=1).reshape(3 * E, E)
    attention = model.transformer.h[0].attn
    weight = install(attention.c_attn, fused)
    parts = split_fused("transformer.h.0.attn.c_attn.weight", weight, config)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    assert_views(split_fused("transformer.h.0.attn.c_attn.weight", weight, config, as_matrix=False), weight)
    x, seen = capture_qkv(model, attention)
    for c in "qkv":
        torch.testing.assert_close(seen[c], heads_of(x, parts[c], D))


def test_mpt_wqkv_concatenated_thirds():
    import inspect

    from transformers.models.mpt import modeling_mpt

    # The forward slices the fused output inline; the test relies on that line being what it was when read.
    assert "mixed_qkv.chunk(3, dim=2)" in inspect.getsource(modeling_mpt.MptAttention.forward)
    config = tf.MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64)
    model = tf.MptForCausalLM(config).double()
    E = 32
    q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
    attention = model.transformer.blocks[0].attn
    weight = install(attention.Wqkv, torch.cat([q, k, v]))
    parts = split_fused("transformer.blocks.0.attn.Wqkv.weight", weight, config)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    assert_views(parts, weight)
    outputs = {}
    handle = attention.Wqkv.register_forward_hook(lambda m, a, out: outputs.update(x=a[0], y=out))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 5)))
    handle.remove()
    for c, seen in zip("qkv", outputs["y"].chunk(3, dim=2)):
        torch.testing.assert_close(seen, outputs["x"] @ parts[c].T)


def test_multihead_attention_in_proj_weight():
    torch.manual_seed(0)
    E, H = 16, 4
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True).double()
    q, k, v = blocks(E, E, 1), blocks(E, E, 2), blocks(E, E, 3)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([q, k, v]))
        mha.in_proj_bias.zero_()
    parts = split_fused("encoder.layers.0.self_attn.in_proj_weight", mha.in_proj_weight, None)
    assert_bitwise(parts, {"q": q, "k": k, "v": v})
    assert_views(parts, mha.in_proj_weight)
    x = blocks(2 * 5, E, 4).view(2, 5, E)
    out, _ = mha(x, x, x, need_weights=False)
    heads = [heads_of(x, parts[c], E // H) for c in "qkv"]
    attended = torch.nn.functional.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(2, 5, E)
    torch.testing.assert_close(out, mha.out_proj(attended))


def test_moe_expert_stacks_split_per_expert_as_views():
    config = tf.MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    config._experts_implementation = (
        "eager"  # the plain per-expert loop of modeling_mixtral (grouped_mm needs fp32)
    )
    model = tf.MixtralForCausalLM(config).double()
    experts = model.model.layers[0].mlp.experts
    E, F, X = 32, 48, 3
    gates, ups, downs = (
        [blocks(F, E, 10 + e) for e in range(X)],
        [blocks(F, E, 20 + e) for e in range(X)],
        [blocks(E, F, 30 + e) for e in range(X)],
    )
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)]))
        experts.down_proj.copy_(torch.stack(downs))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    role = classify(name, experts.gate_up_proj.shape, config)
    assert role.stacked and role.parts == tuple(f"e{e}.{c}" for e in range(X) for c in ("ffn_gate", "ffn_up"))
    parts = split_fused(name, experts.gate_up_proj, config)
    assert_bitwise(
        parts, {f"e{e}.{c}": t for e in range(X) for c, t in (("ffn_gate", gates[e]), ("ffn_up", ups[e]))}
    )
    assert_views(parts, experts.gate_up_proj)
    down = split_fused("model.layers.0.mlp.experts.down_proj", experts.down_proj, config)
    assert_bitwise(down, {f"e{e}.ffn_down": downs[e] for e in range(X)})
    assert_views(down, experts.down_proj)
    # the real expert forward, every token routed to expert e with weight 1, equals the split matrices' SwiGLU
    h = blocks(6, E, 7)
    act = torch.nn.functional.silu
    for e in range(X):
        index = torch.full((6, 1), e)
        with torch.no_grad():
            out = experts(h, index, torch.ones(6, 1, dtype=h.dtype))
        manual = (act(h @ parts[f"e{e}.ffn_gate"].T) * (h @ parts[f"e{e}.ffn_up"].T)) @ down[
            f"e{e}.ffn_down"
        ].T
        torch.testing.assert_close(out, manual)


def olmo1_block_reference(x, att_proj, ff_proj, d_model, kv_dim):
    """The two OLMo-1 lines split_fused relies on (allenai/OLMo olmo/model.py; not in transformers):
    ``q, k, v = att_proj(x).split((d_model, kv_dim, kv_dim), dim=-1)`` and SwiGLU
    ``x, x_gate = ff_proj(x).chunk(2, dim=-1); act(x_gate) * x``: the first half is up, the second the gate."""
    q, k, v = (x @ att_proj.T).split((d_model, kv_dim, kv_dim), dim=-1)
    up, gate = (x @ ff_proj.T).chunk(2, dim=-1)
    return q, k, v, torch.nn.functional.silu(gate) * up


def test_olmo1_native_att_proj_and_ff_proj():
    E, F, kv = 32, 48, 16
    config = {"model_type": "olmo", "d_model": E, "n_heads": 4, "n_kv_heads": 2}
    att = torch.cat([blocks(E, E, 1), blocks(kv, E, 2), blocks(kv, E, 3)])
    ff = torch.cat([blocks(F, E, 4), blocks(F, E, 5)])
    parts = split_fused("model.transformer.blocks.0.att_proj.weight", att, config)
    ffn = split_fused("model.transformer.blocks.0.ff_proj.weight", ff, config)
    assert_views(parts, att)
    assert_views(ffn, ff)
    x = blocks(5, E, 6)
    q, k, v, hidden = olmo1_block_reference(x, att, ff, E, kv)
    for c, seen in zip("qkv", (q, k, v)):
        torch.testing.assert_close(seen, x @ parts[c].T)
    torch.testing.assert_close(
        hidden, torch.nn.functional.silu(x @ ffn["ffn_gate"].T) * (x @ ffn["ffn_up"].T)
    )
    assert torch.equal(ffn["ffn_up"], ff[:F]) and torch.equal(ffn["ffn_gate"], ff[F:])


META_LAYOUTS = [
    (
        "gpt_neox.layers.0.attention.query_key_value.weight",
        (96, 32),
        {"model_type": "gpt_neox", "num_attention_heads": 4, "hidden_size": 32},
    ),
    (
        "h.0.self_attention.query_key_value.weight",
        (96, 32),
        {"model_type": "bloom", "n_head": 4, "hidden_size": 32},
    ),
    (
        "h.0.self_attention.query_key_value.weight",
        (48, 32),
        {"model_type": "falcon", "num_attention_heads": 4, "hidden_size": 32, "multi_query": True},
    ),
    (
        "h.0.self_attention.query_key_value.weight",
        (64, 32),
        {
            "model_type": "falcon",
            "num_attention_heads": 4,
            "hidden_size": 32,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
        },
    ),
    ("transformer.h.0.attn.c_attn.weight", (32, 96), {"model_type": "gpt2", "n_head": 4, "n_embd": 32}),
    (
        "transformer.h.0.attn.c_attn.weight",
        (48, 32),
        {"model_type": "gpt_bigcode", "n_head": 4, "n_embd": 32, "multi_query": True},
    ),
    (
        "model.layers.0.self_attn.qkv_proj.weight",
        (64, 32),
        {"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32},
    ),
    ("model.layers.0.mlp.gate_up_proj.weight", (96, 32), {"model_type": "phi3"}),
    ("transformer.blocks.0.attn.Wqkv.weight", (96, 32), {"model_type": "mpt"}),
    ("layers.0.self_attn.in_proj_weight", (48, 16), None),
    ("model.layers.0.mlp.experts.gate_up_proj", (3, 32, 32), {"model_type": "mixtral"}),
    ("model.layers.0.mlp.experts.gate_up_proj", (3, 32, 32), {"model_type": "gpt_oss"}),
    ("model.layers.0.mlp.experts.down_proj", (3, 32, 16), None),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (24, 32), {"model_type": "deepseek_v3", "kv_lora_rank": 16}),
    (
        "model.layers.0.self_attn.kv_b_proj.weight",
        (4 * 24, 16),
        {"model_type": "deepseek_v3", "qk_nope_head_dim": 8, "v_head_dim": 16},
    ),
    ("transformer.h.0.attn.qkv_proj.weight", (96, 32), {"model_type": "codegen"}),
]


@pytest.mark.parametrize("name, shape, config", META_LAYOUTS)
def test_every_layout_splits_meta_proxies_into_views(name, shape, config):
    # Sharded monitoring splits a meta proxy of the global shape and reads each view's geometry: with
    # as_matrix=False every layout must return views of the proxy, covering each element exactly once.
    proxy = torch.empty(shape, device="meta")
    parts = split_fused(name, proxy, config, as_matrix=False)
    assert parts and all(p.is_meta and p._base is proxy for p in parts.values())
    assert sum(p.numel() for p in parts.values()) == proxy.numel()
    assert tuple(parts) == classify(name, shape, config).parts

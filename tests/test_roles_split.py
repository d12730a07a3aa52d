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

from weibull_monitor.roles import classify, split_fused

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
    with pytest.raises(ValueError, match="model_type"):
        split_fused("h.0.self_attention.query_key_value.weight", torch.zeros(12, 4), None)
    assert classify("h.0.self_attention.query_key_value.weight").component == "qkv"

"""Tiny random configs for every model type of the installed transformers: the defaults of the type's config class
with every size shrunk by one set of rules (by key name), plus a short table of per-family fixes where the rules
alone do not make a config the family's own validation accepts or its forward pass runs.

Nothing is downloaded: configs come from ``AutoConfig.for_model`` and models are built with random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "EXTRA_FAMILIES",
    "FIXES",
    "LAYERS",
    "PREPARE",
    "config_class",
    "input_ids",
    "model_class",
    "shrink",
    "tiny_config",
]

LAYERS = 2
# key -> tiny value; a key that ends with one of these (``encoder_ffn_dim``) is shrunk the same way
_SIZES: dict[str, int] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "embed_dim": 64,
    "word_embed_proj_dim": 64,
    "embedding_size": 64,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "n_inner": 96,
    "d_ff": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "num_attention_heads": 4,
    "attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_local_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "max_window_layers": LAYERS,
    "state_size": 8,
    "d_state": 8,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "hidden_size_per_layer_input": 16,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
    "out_hidden_size": 64,
    "text_hidden_size": 64,
    "vision_hidden_size": 64,
    "projector_hidden_size": 64,
    "rotary_dim": 8,
    "emb_dim": 64,
    "moe_k": 2,
    "num_experts_per_token": 2,
    "num_expert_group": 1,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "ffn_hidden_size": 96,
    "expert_ffn_hidden_size": 32,
    "zero_expert_num": 2,
    "moe_num_shared_experts": 1,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "mamba_dt_rank": 8,
    "adapter_rank": 8,
    "hc_lowrank": 8,
    "ple_embed_dim": 64,
    "laurel_rank": 8,
    "vocab_size_per_layer_input": 128,
    "num_kv_shared_layers": 0,
    "mamba_d_ssm": 128,
    "mamba_chunk_size": 16,
    "dim_head": 16,
    "dim_ff": 96,
    "position_bias_num_buckets": 32,
    "position_bias_max_distance": 64,
    "embedding_dim": 64,
    "encoder_hash_byte_group_vocab": 256,
    "global_head_dim": 16,
}
_LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "depth",
)
_TOKEN_KEYS = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "sep_token_id": 2,
}
# special token ids that must fall inside the tiny vocabulary
_TOKEN_ID_SUFFIXES = ("_token_id", "_token_index")


_SUFFIXES = {
    "_ffn_dim": 96,
    "_intermediate_size": 96,
    "_attention_heads": 4,
    "_hidden_size": 64,
    "_vocab_size": 128,
}


def _tiny(key: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if key in _SIZES:
        return min(value, _SIZES[key])
    if key in _LAYER_KEYS:
        return min(value, LAYERS)
    for suffix, tiny in _SUFFIXES.items():
        if key.endswith(suffix):
            return min(value, tiny)
    return value


def shrink(config: Mapping[str, Any]) -> dict[str, Any]:
    """A tiny copy of a config dict (nested sub-config dicts shrunk too)."""
    out: dict[str, Any] = {}
    layers = next((config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    heads = config.get("num_attention_heads")
    for key, value in config.items():
        if key == "per_layer_config" and isinstance(value, Mapping):
            # layer index -> overrides: keep one special layer, moved to the last tiny layer
            special = [v for _, v in sorted(value.items(), key=lambda kv: int(kv[0]))][:1]
            out[key] = {LAYERS - 1: shrink(special[0])} if special else {}
        elif isinstance(value, Mapping) and key.endswith("config"):
            out[key] = shrink(value)
        elif key == "num_key_value_heads" and isinstance(value, int) and isinstance(heads, int):
            out[key] = _SIZES["num_attention_heads"] if value == heads else min(value, 2)
        elif isinstance(value, list) and layers and len(value) == layers and layers > LAYERS:
            out[key] = [_tiny(key, v) for v in _representative(value)]
        else:
            out[key] = _tiny(key, value)
    if isinstance(
        out.get("qk_rope_head_dim"), int
    ):  # multi-head latent attention: rope dims are the head dim
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
    vocab = out.get("vocab_size")
    if isinstance(vocab, int):
        for key, value in list(out.items()):
            if key in _TOKEN_KEYS and (isinstance(value, int) or value is None):
                out[key] = _TOKEN_KEYS[key]
            elif key.endswith(_TOKEN_ID_SUFFIXES) and isinstance(value, int) and value >= vocab:
                out[key] = vocab - 1 - (hash(key) % 8)
            elif key.endswith(_TOKEN_ID_SUFFIXES) and isinstance(value, list):
                out[key] = [v if not isinstance(v, int) or v < vocab else 2 for v in value]
    return out


def _representative(values: list[Any]) -> list[Any]:
    """``LAYERS`` per-layer entries that keep each kind of layer present once where possible (hybrids)."""
    kinds: list[Any] = []
    for value in values:
        if value not in kinds:
            kinds.append(value)
    picked = kinds[:LAYERS]
    while len(picked) < LAYERS:
        picked.append(values[len(picked)])
    return picked


# per-family fixes: model_type -> overrides applied after the rules (a callable gets the shrunk dict and edits it)
def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    def apply(config: dict[str, Any]) -> None:
        config.update(values)

    return apply


FIXES: dict[str, Callable[[dict[str, Any]], None]] = {
    # hybrids: one layer of each kind (the rules alone would keep only the first kind)
    "bamba": _set(attn_layer_indices=[1], mamba_n_heads=8),
    "falcon_h1": _set(mamba_n_heads=8),
    "granitemoehybrid": _set(layer_types=["mamba", "attention"], mamba_n_heads=8),
    "jamba": _set(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": _set(block_types=["recurrent", "attention"]),
    "xlstm": _set(qk_dim_factor=1.0),
    "zamba": _set(
        layers_block_type=None,
        num_hidden_layers=6,
        attn_layer_period=3,
        attn_layer_offset=2,
        attention_hidden_size=128,
        attention_head_dim=32,
        n_mamba_heads=2,
    ),
    "zamba2": _set(
        layers_block_type=["mamba", "hybrid"],
        n_mamba_heads=8,
        mamba_headdim=16,
        attention_hidden_size=128,
        attention_head_dim=32,
        kv_channels=32,
        num_query_groups=4,
    ),
    "lfm2_moe": _set(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # SSMs whose head sizes must multiply out to expand * hidden_size
    "mamba2": _set(num_heads=8, head_dim=16, n_groups=1),
    "deepseek_v2": _set(num_experts_per_tok=2),
    "gpt_neo": _set(attention_types=[[["global", "local"], 1]], num_layers=LAYERS),
    "reformer": _set(
        is_decoder=True,
        attn_layers=["local", "lsh"],
        axial_pos_shape=[8, 8],
        axial_pos_embds_dim=[32, 32],
        num_hidden_layers=LAYERS,
        feed_forward_size=96,
    ),
    "xlnet": _set(n_layer=LAYERS, d_model=64, n_head=4, d_inner=96, d_head=16),
    "prophetnet": _set(
        num_encoder_layers=LAYERS, num_decoder_layers=LAYERS, encoder_ffn_dim=96, decoder_ffn_dim=96
    ),
    "plbart": _set(encoder_attention_heads=4, decoder_attention_heads=4),
}

#: model_type -> what to do to a freshly built model before its forward pass
PREPARE: dict[str, Callable[[Any], None]] = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}


def input_ids(model_type: str, config: Any, length: int = 16) -> Any:
    """The token ids a sweep feeds: two sequences of ``length`` ids (one per codebook for audio decoders). 32
    tokens leave a ReLU feature dead on all of them with probability 2**-32, so no MLP feature goes unseen."""
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", None) or 128)
    rows = int(getattr(text, "num_codebooks", None) or 1) if model_type.startswith("musicgen") else 2
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, max(vocab, 4), (rows, length), generator=generator)


class TorchEncoder:
    """``torch.nn.TransformerEncoderLayer`` blocks (nn.MultiheadAttention with its packed ``in_proj_weight``) under a
    causal mask: the sweep's check of torch's own fused layout, which vision heads of several VLMs use too."""

    @staticmethod
    def build() -> Any:
        import torch
        from torch import nn

        class Encoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed_tokens = nn.Embedding(128, 64)
                self.layers = nn.ModuleList(
                    nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=True)
                    for _ in range(LAYERS)
                )
                self.lm_head = nn.Linear(64, 128, bias=False)

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                x = self.embed_tokens(input_ids)
                mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
                for layer in self.layers:
                    x = layer(x, src_mask=mask, is_causal=True)
                return self.lm_head(x)

        torch.manual_seed(0)
        return Encoder().eval()


#: Encoder and encoder-decoder families docs/roles.md lists, swept with the causal LMs: type -> model class name
EXTRA_FAMILIES = {
    "torch_mha": "TorchEncoder",
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "deberta-v2": "DebertaV2ForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "vit": "ViTForImageClassification",
}


def tiny_config(model_type: str) -> Any:
    """The tiny config of a model type (a transformers ``PretrainedConfig``)."""

    defaults = config_class(model_type)().to_dict()
    values = shrink(defaults)
    fix = FIXES.get(model_type)
    if fix is not None:
        fix(values)
    changed = {key: value for key, value in values.items() if defaults.get(key, _MISSING) != value}
    return config_class(model_type)(**changed)


_MISSING = object()


def model_class(model_type: str) -> Any:
    """The class a sweep builds for a model type: its causal LM, or the class EXTRA_FAMILIES names."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type == "torch_mha":
        return TorchEncoder
    name = EXTRA_FAMILIES.get(model_type) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return getattr(transformers, name)


def config_class(model_type: str) -> Any:
    """The config class the model class takes (a causal LM of a multimodal type takes its text config)."""
    cls = getattr(model_class(model_type), "config_class", None)
    if cls is None or not isinstance(cls, type):
        from transformers import AutoConfig

        return lambda **kw: AutoConfig.for_model(model_type, **kw)
    return cls

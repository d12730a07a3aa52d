"""The suite's architectures, the attention probe (ground truth from activations) and the weights-only signals.

Architectures (all byte-level, vocabulary 256, 2 layers, hidden 128, 4 heads of 32, untied head):

- ``llama_mha``: LLaMA with separate Q/K (``num_key_value_heads == num_attention_heads``);
- ``llama_gqa``: LLaMA with grouped-query attention (2 KV heads);
- ``neox``: GPT-NeoX, fused ``query_key_value`` (per-head interleaved Q, K, V rows);
- ``qwen3_mha`` / ``qwen3_gqa``: Qwen3, i.e. the LLaMA block plus per-head RMSNorm on q and k (qk-norm): the
  matched controls of the LLaMA pair at the same learning rates;
- ``demo_llama``: the model of ``weibull-monitor demo`` (LLaMA, 4 layers, hidden 128, GQA 4/2), trained like the
  demo (lr 3e-3, wd 0.1, β2 0.999, batch 8 × 64) but in this suite's loop, so the weights-only rule sees it too;
- ``torch_encoder``: ``nn.TransformerEncoder`` with PyTorch's default (uniform / Xavier) initialisation, k = 1.36
  at step 0 instead of 1.2054; no probe (loss, gradient and weight signals only).

The HF models run their attention through one registered function, ``wm_probe``: the eager computation
(``softmax(q kᵀ · scaling + mask) v``) plus, under ``no_grad``, the mean row entropy per head and the largest
pre-softmax logit per layer. These are the activation signals the labels use; the monitor never sees them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._toy import BYTE_VOCAB

ARCHS = ("llama_mha", "llama_gqa", "neox", "qwen3_mha", "qwen3_gqa", "torch_encoder", "demo_llama")
HIDDEN, LAYERS, HEADS, HEAD_DIM, FFN = 128, 2, 4, 32, 344
ATTN_IMPL = "wm_probe"


# ------------------------------------------------------------------------------------------- attention probe


@dataclass
class ProbeRecord:
    entropy: list[float]  # per layer: mean row entropy over batch, heads, rows (nats)
    entropy_min_head: list[float]  # per layer: the lowest head's mean row entropy
    logit_max: list[float]  # per layer: the largest |q·k·scaling| over unmasked positions


class AttentionProbe:
    """Collects per-layer attention statistics during a forward pass (one training step)."""

    active: AttentionProbe | None = None

    def __init__(self) -> None:
        self._rows: dict[int, tuple[float, float, float]] = {}

    def add(self, layer: int, entropy: float, entropy_min_head: float, logit_max: float) -> None:
        self._rows[layer] = (entropy, entropy_min_head, logit_max)

    def take(self) -> ProbeRecord | None:
        if not self._rows:
            return None
        layers = sorted(self._rows)
        rows = [self._rows[i] for i in layers]
        self._rows = {}
        return ProbeRecord([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def probe_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, plus the probe's statistics (no effect on the computation)."""
    groups = query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, groups)
    value_states = _repeat_kv(value, groups)
    t_q, t_k = query.shape[2], key_states.shape[2]
    scores = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = scores + attention_mask[:, :, :, :t_k]
    else:  # causal mask built here when the model passes none (a boolean-free, additive mask)
        causal = torch.full((t_q, t_k), float("-inf"), dtype=scores.dtype).triu(1 + t_k - t_q)
        logits = scores + causal
    weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probe = AttentionProbe.active
    if probe is not None:
        with torch.no_grad():
            visible = torch.isfinite(logits) & (logits > -1e30)
            entropy_rows = -torch.special.xlogy(weights, weights).sum(-1)  # [b, h, t]
            per_head = entropy_rows.mean(dim=(0, 2))
            visible_scores = torch.where(visible, scores, torch.zeros_like(scores))
            logit_max = visible_scores.abs().amax()
            probe.add(
                int(getattr(module, "layer_idx", 0) or 0),
                float(per_head.mean()),
                float(per_head.min()),
                float(logit_max),
            )
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    return out, weights


_registered = False


def register_probe() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, probe_attention_forward)
    _registered = True


# ------------------------------------------------------------------------------------------------- models


class TorchEncoderLM(nn.Module):
    """A causal byte LM from ``nn.TransformerEncoder`` with PyTorch's default initialisation (not Gaussian)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, HIDDEN)
        self.pos = nn.Embedding(256, HIDDEN)
        layer = nn.TransformerEncoderLayer(
            HIDDEN, HEADS, dim_feedforward=4 * HIDDEN, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, BYTE_VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)[None]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        x = self.encoder(x, mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, BYTE_VOCAB).float(), labels[:, 1:].reshape(-1)
            )
        return _Output(loss, logits)


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


def build_model(arch: str, seed: int) -> nn.Module:
    """A freshly initialised model of ``arch`` (deterministic for a seed)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {ARCHS}")
    torch.manual_seed(seed)
    if arch == "torch_encoder":
        return TorchEncoderLM()
    register_probe()
    common = {
        "vocab_size": BYTE_VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    if arch == "demo_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        common.update(num_hidden_layers=4, max_position_embeddings=64)
        config = LlamaConfig(**common, intermediate_size=FFN, num_key_value_heads=2)
        cls = LlamaForCausalLM
    elif arch.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        kv = HEADS if arch == "llama_mha" else 2
        config = LlamaConfig(**common, intermediate_size=FFN, num_key_value_heads=kv)
        cls = LlamaForCausalLM
    elif arch.startswith("qwen3"):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        kv = HEADS if arch == "qwen3_mha" else 2
        config = Qwen3Config(**common, intermediate_size=FFN, num_key_value_heads=kv, head_dim=HEAD_DIM)
        cls = Qwen3ForCausalLM
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(**common, intermediate_size=4 * HIDDEN)
        cls = GPTNeoXForCausalLM
    config._attn_implementation = ATTN_IMPL
    model = cls(config)
    model.config._attn_implementation = ATTN_IMPL
    return model


def has_qk_norm(arch: str) -> bool:
    """Whether the architecture normalises q and k per head (the monitor would read it off the module tree)."""
    return arch.startswith("qwen3")


# ---------------------------------------------------------------------------------- weights-only signals


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's Q and K projections per head, with the gain of the norm that feeds them."""

    layer: int
    q_heads: list[torch.Tensor]  # each [head_dim, hidden]
    k_heads: list[torch.Tensor]  # each [head_dim, hidden], one per query head (GQA: repeated)
    gain: torch.Tensor | None  # [hidden] or None
    scaling: float


def _layers(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "gpt_neox.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    return []


def attention_weights(model: nn.Module) -> Iterator[AttentionWeights]:
    """Per-head W_q^h and W_k^h of every layer (no copies); nothing for models without an HF block."""
    scaling = HEAD_DIM**-0.5
    for index, layer in enumerate(_layers(model)):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        gain = getattr(getattr(layer, "input_layernorm", None), "weight", None)
        if hasattr(attn, "q_proj"):
            wq, wk = attn.q_proj.weight, attn.k_proj.weight
            n_q, n_kv = wq.shape[0] // HEAD_DIM, wk.shape[0] // HEAD_DIM
            q = [wq[h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in range(n_q)]
            kh = [wk[g * HEAD_DIM : (g + 1) * HEAD_DIM] for g in range(n_kv)]
            k = [kh[h // (n_q // n_kv)] for h in range(n_q)]
        elif hasattr(attn, "query_key_value"):  # GPT-NeoX: rows grouped per head as [q_h; k_h; v_h]
            w = attn.query_key_value.weight
            n = w.shape[0] // (3 * HEAD_DIM)
            q = [w[3 * h * HEAD_DIM : (3 * h + 1) * HEAD_DIM] for h in range(n)]
            k = [w[(3 * h + 1) * HEAD_DIM : (3 * h + 2) * HEAD_DIM] for h in range(n)]
        else:
            continue
        yield AttentionWeights(index, q, k, gain, scaling)


def _qk_norm_gains(model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (q_norm gain, k_norm gain) for models with qk-norm (Qwen3: per head, over head_dim)."""
    out = {}
    for index, layer in enumerate(_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):
            out[index] = (attn.q_norm.weight, attn.k_norm.weight)
    return out


@torch.no_grad()
def qk_head_norms(model: nn.Module) -> list[list[float]]:
    """Per layer, per head: the largest attention logit a unit-RMS input could produce through that head, from the
    weights only (RoPE's rotation aside). Without qk-norm: ‖diag(g) W_q^hᵀ W_k^h diag(g)‖₂ · scaling · hidden (g the
    gain of the norm feeding the attention). With qk-norm (q and k RMS-normalised per head, then scaled by gains
    g_q, g_k): scaling · head_dim · max|g_q| · max|g_k|, since the projections' scale no longer reaches the logits."""
    gains = _qk_norm_gains(model)
    out = []
    for aw in attention_weights(model):
        if aw.layer in gains:
            g_q, g_k = gains[aw.layer]
            bound = aw.scaling * HEAD_DIM * float(g_q.abs().max()) * float(g_k.abs().max())
            out.append([bound] * len(aw.q_heads))
            continue
        norms = []
        for q, k in zip(aw.q_heads, aw.k_heads):
            q32, k32 = q.float(), k.float()
            if aw.gain is not None:
                q32, k32 = q32 * aw.gain.float(), k32 * aw.gain.float()
            # σ_max(Qᵀ K) = σ_max(R_Q R_Kᵀ) from the QR factors of Qᵀ and Kᵀ ([d, d], cheap)
            r_q = torch.linalg.qr(q32.T, mode="r")[1]
            r_k = torch.linalg.qr(k32.T, mode="r")[1]
            value = torch.linalg.matrix_norm(r_q @ r_k.T, ord=2)
            norms.append(float(value) * aw.scaling * HIDDEN)  # a unit-RMS input has ‖x‖² = hidden
        out.append(norms)
    return out


@torch.no_grad()
def weight_norms(model: nn.Module) -> dict[str, float]:
    """Frobenius norm of every 2-D parameter (NaN-propagating)."""
    return {name: float(p.float().norm()) for name, p in model.named_parameters() if p.ndim == 2}


def is_matrix_of_layer(name: str, layer: int) -> bool:
    return f"layers.{layer}." in name


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

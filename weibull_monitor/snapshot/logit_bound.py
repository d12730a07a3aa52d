"""Weights-only attention-logit bounds: per layer and head, the largest pre-softmax logit that a unit-RMS input can
produce through that head, read from W_q, W_k and the norm gains alone (no activation, no forward pass).

Without qk-norm: ``‖diag(g) W_q^hᵀ W_k^h diag(g)‖₂ · scaling · hidden`` (g: the gain of the norm that feeds the
attention, hidden: the projections' input width, ``scaling = head_dim**-0.5``). With qk-norm (q and k normalised,
then scaled by gains g_q, g_k over ``n`` elements): ``scaling · n · max|g_q| · max|g_k|``, because the projections'
scale no longer reaches the logits. RoPE's relative rotation is left out (it changes which logit is largest, not the
bound's growth). docs/alerts.md (rule ``attention_logit_bound``) has the evidence and the cost.

The Q and K rows come from the entries the role map already built (separate projections, GQA groups, and the parts
of fused projections that a verified layout split). Nothing is gathered: a sharded Q or K (FSDP, ZeRO-3, tensor
parallel) or a layout that cannot be told skips the bound with a recorded reason.

Computation per layer, batched over heads: the Gram matrices G_q = Q_h diag(g²) Q_hᵀ and G_k (head_dim × head_dim,
one read of each matrix), then σ_max(Q_hᵀ K_h)² = λ_max(Lᵀ G_k L) with G_q = L Lᵀ (Cholesky; a small symmetric
eigendecomposition per head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from weibull_monitor.distributed.matrix import LocalMatrix
from weibull_monitor.estimator.histogram import torch_on_one_thread
from weibull_monitor.models.config import head_counts
from weibull_monitor.models.roles import layer_of
from weibull_monitor.snapshot.record import MatrixEntry

__all__ = ["LogitBounds", "attention_logit_bounds", "qk_norm_gains"]

#: Names of the norm whose output feeds the attention projections (its gain scales every input column).
_INPUT_NORM = re.compile(
    r"(input_layernorm|ln_1|attention_norm|attn_norm|input_layer_norm|pre_attention_layernorm|norm1|ln_attn)"
    r"\.weight$"
)
_Q_NORM = re.compile(r"(q_norm|q_layernorm|query_layernorm)\.weight$")
_K_NORM = re.compile(r"(k_norm|k_layernorm|key_layernorm)\.weight$")


@dataclass
class LogitBounds:
    """The bounds of one snapshot: ``bounds[layer]`` one value per query head; ``qk_norm`` whether the attention
    normalises q and k (None: no attention found); ``skipped`` layer -> why it has no bound."""

    bounds: dict[int, list[float]] = field(default_factory=dict)
    qk_norm: bool | None = None
    skipped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


def qk_norm_gains(params: Mapping[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (q-norm gain, k-norm gain) for attentions with qk-norm (Qwen3, OLMo-2, Gemma 3, ...)."""
    q_gain, k_gain = {}, {}
    for name, param in params.items():
        layer = layer_of(name)
        if layer is None or param.ndim != 1:
            continue
        if _Q_NORM.search(name):
            q_gain[layer] = param
        elif _K_NORM.search(name):
            k_gain[layer] = param
    return {layer: (q_gain[layer], k_gain[layer]) for layer in q_gain if layer in k_gain}


def _input_gains(params: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = {}
    for name, param in params.items():
        layer = layer_of(name)
        if layer is not None and param.ndim == 1 and _INPUT_NORM.search(name) and layer not in out:
            out[layer] = param
    return out


def _tensor(entry: MatrixEntry) -> torch.Tensor | None:
    matrix = entry.matrix
    if not isinstance(matrix, LocalMatrix):
        return None
    tensor = matrix.tensor
    return None if tensor.device.type == "meta" else tensor


@torch.no_grad()
def _head_bounds(q: torch.Tensor, k: torch.Tensor, head_dim: int, gain: torch.Tensor | None) -> list[float]:
    """σ_max(diag(g) Q_hᵀ K_h diag(g)) · scaling · hidden per query head (K heads repeated over GQA groups)."""
    hidden = q.shape[-1]
    wq = q.detach().reshape(-1, head_dim, hidden).float()
    wk = k.detach().reshape(-1, head_dim, hidden).float()
    if gain is not None and gain.numel() == hidden:
        g = gain.detach().float().reshape(1, 1, hidden)
        wq, wk = wq * g, wk * g
    gram_q = wq @ wq.transpose(1, 2)
    gram_k = wk @ wk.transpose(1, 2)
    n_q, n_kv = gram_q.shape[0], gram_k.shape[0]
    if n_kv != n_q:
        gram_k = gram_k.repeat_interleave(n_q // n_kv, dim=0)
    gram_q, gram_k = gram_q.double(), gram_k.double()
    # λ_max(G_q G_k) = λ_max(Lᵀ G_k L) with G_q = L Lᵀ (a Cholesky factor: 2-3x cheaper than a square root by
    # eigendecomposition); a singular G_q (a zero or rank-deficient head) takes the square root instead
    factor, info = torch.linalg.cholesky_ex(gram_q)
    if bool((info != 0).any()):
        values, vectors = torch.linalg.eigh(gram_q)
        factor = (vectors * values.clamp_min(0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)
    top = torch.linalg.eigvalsh(factor.transpose(1, 2) @ gram_k @ factor)[:, -1].clamp_min(0).sqrt()
    return [float(v) * head_dim**-0.5 * hidden for v in top]


def attention_logit_bounds(
    model: torch.nn.Module, entries: Iterable[MatrixEntry], config: Any = None
) -> LogitBounds:
    """The per-head bounds of every attention layer that has both a Q and a K entry (see the module docstring)."""
    import time

    started = time.perf_counter()
    out = LogitBounds()
    qk: dict[int, dict[str, MatrixEntry]] = {}
    for entry in entries:
        role = entry.role
        if role.layer is not None and role.component in ("q", "k") and role.expert is None:
            qk.setdefault(int(role.layer), {})[role.component] = entry
    if not qk:
        return out
    params = dict(model.named_parameters())
    qk_gains = qk_norm_gains(params)
    out.qk_norm = bool(qk_gains)
    input_gains = _input_gains(params)
    try:
        heads, kv_heads, head_dim = head_counts(config)
    except (ValueError, TypeError) as error:
        out.skipped = {layer: f"head count unknown ({error})" for layer in qk}
        return out
    for layer, parts in sorted(qk.items()):
        if "q" not in parts or "k" not in parts:
            out.skipped[layer] = "Q or K of this layer not found by the role map"
            continue
        q, k = _tensor(parts["q"]), _tensor(parts["k"])
        if q is None or k is None:
            out.skipped[layer] = "Q/K sharded or not materialised: the bound is not computed (never gathered)"
            continue
        if q.numel() != heads * head_dim * q.shape[-1] or k.numel() != kv_heads * head_dim * k.shape[-1]:
            out.skipped[layer] = (
                f"Q/K shapes {tuple(q.shape)}/{tuple(k.shape)} do not match {heads}/{kv_heads} heads of {head_dim}"
            )
            continue
        if heads % kv_heads:
            out.skipped[layer] = f"{heads} query heads do not split into {kv_heads} key/value groups"
            continue
        if layer in qk_gains:
            g_q, g_k = qk_gains[layer]
            n = head_dim if g_q.numel() == head_dim else g_q.numel()
            bound = head_dim**-0.5 * n * float(g_q.detach().abs().max()) * float(g_k.detach().abs().max())
            out.bounds[layer] = [bound] * heads
            continue
        # one torch thread: the per-head Cholesky and eigvalsh calls on head_dim² matrices are too small to share,
        # and a second OpenMP thread made them 5-20x slower here (docs/alerts.md, the bound's cost)
        with torch_on_one_thread(q.device):
            out.bounds[layer] = _head_bounds(q, k, head_dim, input_gains.get(layer))
    out.seconds = time.perf_counter() - started
    return out

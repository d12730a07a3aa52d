"""Train one run of the suite: a RunStore written by the monitor (``rules=[]``: every fit and stat, no alert) and
a JSON of ground-truth signals, both cached under ``<out>/<run name>/`` so scoring replays without retraining.

Signals per optimizer step: loss, gradient norm (before clipping), learning rate, per-layer attention entropy
(mean and lowest head) and largest pre-softmax logit (the attention probe, activations). Per snapshot step
(``every``): Frobenius norm of every 2-D parameter and per-head ‖W_q^h W_k^hᵀ‖₂ (weights only).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ._toy import byte_batches
from .models import AttentionProbe, attention_weights, build_model, qk_head_norms, weight_norms
from .runs import RunSpec, lr_at

SIGNALS = "signals.json"
STORE = "store.sqlite"
#: Steps the run goes on after a non-finite loss (so the monitor sees the non-finite weights), then stops.
STEPS_AFTER_NONFINITE = 10


def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / spec.name


def is_cached(out: Path, spec: RunSpec) -> bool:
    path = run_dir(out, spec) / SIGNALS
    if not path.exists() or not (run_dir(out, spec) / STORE).exists():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("complete")) and data.get("digest") == spec.digest()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def _apply_event(model: torch.nn.Module, event: dict[str, Any], generator: torch.Generator) -> None:
    kind = event["kind"]
    if kind == "lr_spike":
        return  # handled by lr_at
    layer = int(event["layer"])
    if kind == "reinit":  # every matrix of one block re-drawn from N(0, std²)
        for name, p in model.named_parameters():
            if p.ndim == 2 and f"layers.{layer}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * float(event["std"]))
    elif kind == "scale":  # W_q and W_k of one block multiplied by a factor (logits grow by factor²)
        factor = float(event["factor"])
        for aw in attention_weights(model):
            if aw.layer == layer:
                for t in (*aw.q_heads, *{id(k): k for k in aw.k_heads}.values()):
                    t.mul_(factor)
    else:
        raise ValueError(f"unknown event kind {kind!r}")


def train(spec: RunSpec, out: Path, *, threads: int = 1, log: Any = None) -> dict[str, Any]:
    """Train ``spec`` and write its store and signals (replacing any previous files of that run)."""
    from weibull_monitor import WeibullMonitor

    torch.set_num_threads(threads)
    directory = run_dir(out, spec)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (STORE, STORE + "-wal", STORE + "-shm", SIGNALS):
        (directory / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    model = build_model(spec.arch, spec.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, spec.weight_decay), lr=lr_at(spec, 1), betas=spec.betas
    )
    monitor = WeibullMonitor(
        model, optimizer, every=spec.every, store=str(directory / STORE), rules=[], run_name=spec.name
    )
    batches = byte_batches(spec.batch, spec.seq_len, seed=1000 + spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    events = {int(e["step"]): e for e in spec.events}
    probe = AttentionProbe()
    AttentionProbe.active = probe
    sig: dict[str, Any] = {
        "spec": spec.to_dict(),
        "digest": spec.digest(),
        "steps": [],
        "loss": [],
        "grad_norm": [],
        "lr": [],
        "attn_entropy": [],
        "attn_entropy_min_head": [],
        "attn_logit_max": [],
        "w_steps": [],
        "weight_norms": {},
        "qk_head_norms": [],
    }
    params = [p for p in model.parameters()]

    def weights_snapshot(step: int) -> None:
        sig["w_steps"].append(step)
        for name, value in weight_norms(model).items():
            sig["weight_norms"].setdefault(name, []).append(value)
        sig["qk_head_norms"].append(qk_head_norms(model))

    monitor.observe(0)
    weights_snapshot(0)
    stop_at = None
    try:
        for step in range(1, spec.steps + 1):
            if step in events:
                _apply_event(model, events[step], generator)
            lr = lr_at(spec, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            max_norm = spec.grad_clip if spec.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = probe.take()
            sig["steps"].append(step)
            sig["loss"].append(float(loss.detach()))
            sig["grad_norm"].append(grad_norm)
            sig["lr"].append(lr)
            if record is not None:
                sig["attn_entropy"].append(record.entropy)
                sig["attn_entropy_min_head"].append(record.entropy_min_head)
                sig["attn_logit_max"].append(record.logit_max)
            monitor.observe(step)
            if step % spec.every == 0:
                weights_snapshot(step)
            if stop_at is None and not math.isfinite(sig["loss"][-1]):
                stop_at = step + STEPS_AFTER_NONFINITE
            if stop_at is not None and step >= stop_at and step % spec.every == 0:
                break
            if log is not None and step % 100 == 0:
                log(f"  {spec.name} step {step} loss {sig['loss'][-1]:.3f}")
    finally:
        AttentionProbe.active = None
        monitor.close()
    sig["wall_s"] = time.perf_counter() - started
    sig["threads"] = threads
    sig["aten_cpu_capability"] = os.environ.get("ATEN_CPU_CAPABILITY", "")
    sig["complete"] = True
    (directory / SIGNALS).write_text(json.dumps(_json_safe(sig)))
    return sig


def _json_safe(x: Any) -> Any:
    """NaN / inf as strings JSON can carry and Python reads back with float()."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def load_signals(directory: Path) -> dict[str, Any]:
    data = json.loads((Path(directory) / SIGNALS).read_text())
    return _floats(data)


def _floats(x: Any) -> Any:
    if x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return x

"""Ground-truth labels and onset steps, from the signals only (never from a Weibull fit or an alert).

The definitions below were fixed before any alert of the suite was computed; docs/alerts.md states them in words.

Per optimizer step t (1-based update count):

- ℓ(t): training loss of that step; m(t): median of ℓ over steps t-4..t (a non-finite loss counts as +inf);
- H(t): min over layers of the mean row entropy of the attention probabilities (nats);
- G(t): max over layers of the largest |pre-softmax attention logit|.

References, per architecture, from the runs built to be healthy (all seeds): G_ref = the largest G any of them
reached. The qk-norm controls use the reference of their LLaMA twin.

A run fails when, at some step t at or after its cause step c (the step of an injected event, else 0), one of:

- ``attention_collapse``: H < 0.3 nats for 5 consecutive steps (healthy runs stay at 0.9-1.3 once trained;
  uniform attention over 128 positions is 3.9); onset = first step of the streak;
- ``logit_blowup``: G > 5·G_ref for 5 consecutive steps; onset = first step of the streak;
- ``divergence``: a non-finite loss, or m(t) > 1.5 · min(m(s), 10 <= s < t) for t > 10; onset = that step;
- ``injected_fault``: the run's design corrupts a layer (re-initialised or scaled); onset = the event step.

The onset is the earliest of these. A run built to fail that meets none is labelled ``benign`` (left out of
recall and reported); a healthy or control run that meets one is labelled failing (and reported).
Descriptive, not part of the label: ``loss_ratio`` = the run's median loss over its last 50 steps over the median
of the same figure over the healthy runs of its architecture.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENTROPY_COLLAPSE = 0.3
LOGIT_BLOWUP_FACTOR = 5.0
DIVERGENCE_FACTOR = 1.5
PERSIST = 5
LOSS_MEDIAN_WINDOW = 5
DIVERGENCE_FROM = 10
TWIN = {"qwen3_mha": "llama_mha", "qwen3_gqa": "llama_gqa"}
FAILING_INTENTS = (
    "lr_too_high", "divergence", "no_wd", "lr_spike", "corrupt_reinit", "corrupt_scale", "selection_deep",
)  # fmt: skip


@dataclass
class Label:
    name: str
    arch: str
    intent: str
    split: str
    every: int
    steps: int  # steps actually trained
    cause: int
    label: str  # failing | healthy | control | benign
    onset: int | None
    criteria: dict[str, int] = field(default_factory=dict)  # criterion -> its onset
    loss_ratio: float = math.nan

    @property
    def failing(self) -> bool:
        return self.label == "failing"

    @property
    def negative(self) -> bool:
        """A run on which any warning is a false alarm (healthy runs and matched controls)."""
        return self.label in ("healthy", "control")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def smoothed_loss(loss: Sequence[float]) -> list[float]:
    vals = [x if _finite(x) else math.inf for x in loss]
    return [statistics.median(vals[max(0, i - LOSS_MEDIAN_WINDOW + 1) : i + 1]) for i in range(len(vals))]


def _streak_onset(steps: Sequence[int], flags: Sequence[bool], start: int) -> int | None:
    run = 0
    for i, (step, flag) in enumerate(zip(steps, flags)):
        if step < start:
            run = 0
            continue
        run = run + 1 if flag else 0
        if run >= PERSIST:
            return steps[i - PERSIST + 1]
    return None


def logit_reference(all_signals: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """arch -> the largest max-logit any healthy-intent run of that architecture reached."""
    ref: dict[str, float] = {}
    for sig in all_signals.values():
        spec = sig["spec"]
        if spec["intent"] != "healthy" or not sig["attn_logit_max"]:
            continue
        peak = max(max(row) for row in sig["attn_logit_max"])
        if _finite(peak):
            ref[spec["arch"]] = max(ref.get(spec["arch"], 0.0), peak)
    return ref


def healthy_final_loss(all_signals: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    finals: dict[str, list[float]] = {}
    for sig in all_signals.values():
        if sig["spec"]["intent"] == "healthy":
            finals.setdefault(sig["spec"]["arch"], []).append(_final_loss(sig))
    return {arch: statistics.median(v) for arch, v in finals.items()}


def _final_loss(sig: Mapping[str, Any]) -> float:
    tail = [x if _finite(x) else math.inf for x in sig["loss"][-50:]]
    return statistics.median(tail) if tail else math.nan


def label_run(sig: Mapping[str, Any], g_ref: Mapping[str, float], final_ref: Mapping[str, float]) -> Label:
    spec = sig["spec"]
    arch, steps = spec["arch"], sig["steps"]
    cause = int(spec["cause_step"])
    criteria: dict[str, int] = {}
    if sig["attn_entropy"]:
        h = [min(row) if all(_finite(x) for x in row) else 0.0 for row in sig["attn_entropy"]]
        onset = _streak_onset(steps, [x < ENTROPY_COLLAPSE for x in h], cause)
        if onset is not None:
            criteria["attention_collapse"] = onset
        ref = g_ref.get(TWIN.get(arch, arch))
        if ref:
            g = [max(row) if all(_finite(x) for x in row) else math.inf for row in sig["attn_logit_max"]]
            onset = _streak_onset(steps, [x > LOGIT_BLOWUP_FACTOR * ref for x in g], cause)
            if onset is not None:
                criteria["logit_blowup"] = onset
    m = smoothed_loss(sig["loss"])
    best = math.inf
    for i, step in enumerate(steps):
        raw = sig["loss"][i]
        if step >= max(cause, 1) and not _finite(raw):
            criteria["divergence"] = step
            break
        if step > DIVERGENCE_FROM and step >= cause and m[i] > DIVERGENCE_FACTOR * best:
            criteria["divergence"] = step
            break
        if step >= DIVERGENCE_FROM:
            best = min(best, m[i])
    if spec["intent"] in ("corrupt_reinit", "corrupt_scale"):
        criteria["injected_fault"] = cause
    onset = min(criteria.values()) if criteria else None
    if onset is not None:
        label = "failing"
    elif spec["intent"] == "healthy":
        label = "healthy"
    elif spec["intent"] == "control":
        label = "control"
    else:
        label = "benign"
    ref_loss = final_ref.get(TWIN.get(arch, arch))
    return Label(
        name=spec["name"],
        arch=arch,
        intent=spec["intent"],
        split=spec["split"],
        every=int(spec["every"]),
        steps=int(steps[-1]) if steps else 0,
        cause=cause,
        label=label,
        onset=onset,
        criteria=criteria,
        loss_ratio=_final_loss(sig) / ref_loss if ref_loss else math.nan,
    )


def label_all(all_signals: Mapping[str, Mapping[str, Any]]) -> dict[str, Label]:
    g_ref = logit_reference(all_signals)
    final_ref = healthy_final_loss(all_signals)
    return {name: label_run(sig, g_ref, final_ref) for name, sig in all_signals.items()}

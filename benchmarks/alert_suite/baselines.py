"""Cheap detectors scored beside the rules: each turns one run into a score series; an alert at threshold θ is the
first step (at or after a start step) whose score is >= θ. A non-finite input scores +inf (it always alerts).

- ``loss_spike``: Lightning's ``SpikeDetection``: (ℓ(t) − mean of the previous 10 losses) / that mean, when ℓ(t) is
  above the previous loss (otherwise no spike); Lightning's default threshold is rtol = 2.
- ``grad_norm``: gradient norm (before clipping) over the median of its previous 50 steps (from step 11).
- ``weight_norm``: max over 2-D matrices of ‖W‖_F / ‖W‖_F at step 0 (weights only, at the snapshot steps).
- ``qk_norm``: max over layers and heads of ‖diag(g) W_q^hᵀ W_k^h diag(g)‖₂ over its step-0 value (weights only).
- ``max_logit``: the largest |pre-softmax attention logit| of the step (needs activations).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INF = math.inf


@dataclass(frozen=True)
class Series:
    steps: list[int]
    values: list[float]

    def first_crossing(self, threshold: float, start: int = 0) -> int | None:
        for step, value in zip(self.steps, self.values):
            if step >= start and value >= threshold:  # NaN compares False: never alerts
                return step
        return None

    def max_between(self, lo: int, hi: int) -> float:
        vals = [v for s, v in zip(self.steps, self.values) if lo <= s <= hi and not math.isnan(v)]
        return max(vals) if vals else -INF


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def loss_spike(sig: Mapping[str, Any], window: int = 10) -> Series:
    steps, losses = sig["steps"], sig["loss"]
    values = []
    history: list[float] = []
    last = None
    for loss in losses:
        if not _finite(loss):
            values.append(INF)
            continue
        if not history or last is None or loss <= last:
            values.append(-INF)
        else:
            mean = statistics.fmean(history[-window:])
            values.append((loss - mean) / mean if mean > 0 else -INF)
        history.append(loss)
        last = loss
    return Series(list(steps), values)


def grad_norm(sig: Mapping[str, Any], window: int = 50, min_history: int = 10) -> Series:
    steps, norms = sig["steps"], sig["grad_norm"]
    values = []
    for i, g in enumerate(norms):
        if not _finite(g):
            values.append(INF)
            continue
        past = [x for x in norms[max(0, i - window) : i] if _finite(x)]
        values.append(g / statistics.median(past) if len(past) >= min_history else -INF)
    return Series(list(steps), values)


def weight_norm(sig: Mapping[str, Any]) -> Series:
    norms = sig["weight_norms"]
    values = []
    for j in range(len(sig["w_steps"])):
        ratios = []
        for series in norms.values():
            if not _finite(series[j]):
                ratios.append(INF)
            elif series[0] > 0:
                ratios.append(series[j] / series[0])
        values.append(max(ratios) if ratios else math.nan)
    return Series(list(sig["w_steps"]), values)


def qk_norm(sig: Mapping[str, Any]) -> Series:
    rows = sig["qk_head_norms"]
    if not rows or not rows[0]:
        return Series([], [])
    first = rows[0]
    values = []
    for row in rows:
        ratios = [
            (INF if not _finite(v) else v / first[layer][head])
            for layer, heads in enumerate(row)
            for head, v in enumerate(heads)
            if first[layer][head] > 0
        ]
        values.append(max(ratios) if ratios else math.nan)
    return Series(list(sig["w_steps"]), values)


def max_logit(sig: Mapping[str, Any]) -> Series:
    rows = sig["attn_logit_max"]
    if not rows:
        return Series([], [])
    values = [max(row) if all(_finite(x) for x in row) else INF for row in rows]
    return Series(list(sig["steps"][: len(values)]), values)


@dataclass(frozen=True)
class Baseline:
    name: str
    series: Callable[[Mapping[str, Any]], Series]
    cheap: bool  # no activations needed
    weights_only: bool
    default: float | None  # a threshold people use, where there is one
    grid: Sequence[float]  # thresholds swept
    source: str = "signals"  # what ``series`` takes: the run's signals dict, or its replayed "snapshots"


def _geom(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


BASELINES = (
    Baseline("loss_spike", loss_spike, True, False, 2.0, [*_geom(0.02, 10.0, 60), INF]),
    Baseline("grad_norm", grad_norm, True, False, None, [*_geom(1.2, 1000.0, 60), INF]),
    Baseline("weight_norm", weight_norm, True, True, 5.0, [*_geom(1.2, 500.0, 60), INF]),
    Baseline("qk_norm", qk_norm, True, True, None, [*_geom(1.5, 1e5, 80), INF]),
    Baseline("max_logit", max_logit, False, False, 100.0, [*_geom(5.0, 1e6, 80), INF]),
)

"""The early-warning rules calibrated on the alert benchmark (docs/alerts.md §5): they fire at or before the attention
collapses, the loss stalls or the run diverges, and stay quiet on healthy runs and on qk-norm controls.

- :class:`AttentionLogitBound` (weights only): a head's attention-logit bound grew far above its start and is large
  enough to make the attention one-hot.
- :class:`ScaleJump`: a matrix's scale λ changes much faster than it ever did in this run.
- :class:`ShapeDriftUp`: a class's shape k rises above where its matrices started (too high a learning rate).

They read only the snapshot: per-matrix figures in ``snapshot.matrices`` (``drift_from_first``,
``scale_rate``...) and the bounds in ``snapshot.logit_bounds``. Everything they compare against (the first
snapshot's k and bounds, earlier scale rates) is kept by the snapshot builder, in the monitor's resumable state,
so a resumed or rewound run measures against the same history; the rule objects hold no state.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from weibull_monitor.alerts.advice import ACTIONS, short_name
from weibull_monitor.alerts.engine import Breach, Rule, check_level
from weibull_monitor.snapshot.classes import members_of
from weibull_monitor.snapshot.dynamics import is_finite_number

__all__ = ["AttentionLogitBound", "ScaleJump", "ShapeDriftUp"]


class AttentionLogitBound(Rule):
    """Weights only: the largest per-head attention-logit bound (``snapshot.logit_bounds``) grew more than
    ``max_growth`` × its value at the layer's first snapshot *and* exceeds ``min_bound`` logits.

    Growth alone depends on the initial scale, the absolute floor alone on the model's size: both are needed. In the
    benchmark healthy runs peak at 23-74 logits (≤ 37× their start) and qk-norm controls at ≤ 33×; failing runs pass
    200-500 before or as the attention entropy collapses. Layers whose bound could not be computed (sharded Q/K,
    unknown layout) are listed in ``snapshot.logit_bounds_skipped`` and never fire.
    """

    name = "attention_logit_bound"
    level = "warning"
    cooldown = 1000

    def __init__(self, max_growth: float = 50.0, min_bound: float = 100.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_growth = float(max_growth)
        self.min_bound = float(min_bound)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        bounds = getattr(snapshot, "logit_bounds", None) or {}
        first = getattr(snapshot, "logit_bounds_first", None) or {}
        worst = None
        for layer, heads in bounds.items():
            starts = first.get(layer) or []
            for head, (value, start) in enumerate(zip(heads, starts)):
                if not (is_finite_number(start) and start > 0):
                    continue
                growth = value / start if is_finite_number(value) else math.inf
                over = not is_finite_number(value) or value > self.min_bound
                if over and growth > self.max_growth and (worst is None or growth > worst[0]):
                    worst = (growth, layer, head, value)
        if worst is None:
            return []
        growth, layer, head, value = worst
        return [
            Breach(
                "heads",
                (),
                {"growth": growth, "bound": value, "layer": layer, "head": head},
                f"attention-logit bound of layer {layer} head {head} is {value:.0f} (x{growth:.0f} since the first "
                f"snapshot): its W_q/W_k can now make the attention one-hot (entropy collapse, stalled loss); "
                f"{ACTIONS['lr']}.",
            )
        ]


class ScaleJump(Rule):
    """A matrix's scale λ changes abruptly: its rate |ln(λ/λ_prev)| per step since the previous snapshot
    (``MatrixStats.scale_rate``) is above ``min_ratio_per_10`` per 10 steps *and* ``factor`` × the fastest rate the
    matrix showed at any earlier snapshot (at least ``min_history`` of them). Selection, Transmission and Value only.

    Relative to the run's own history because early training, and a warm-up at a high but survivable learning rate,
    move λ fast legitimately: in the benchmark healthy runs change λ at most ×1.23 per 10 steps (in their first 50
    steps), later ×1.08; a learning-rate spike or a corrupted layer moves it ×2.4-8 within one interval.
    """

    name = "scale_jump"
    level = "warning"
    cooldown = 200

    def __init__(
        self,
        min_ratio_per_10: float = 1.5,
        factor: float = 3.0,
        min_history: int = 3,
        classes: Sequence[str] = ("selection", "transmission", "value"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.min_rate = math.log(float(min_ratio_per_10)) / 10
        self.factor = float(factor)
        self.min_history = int(min_history)
        self.classes = tuple(classes)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        stats = getattr(snapshot, "matrices", {}) or {}
        jumped = []
        for klass in self.classes:
            for key in members_of(snapshot, klass):
                s = stats.get(key)
                rate, before = (
                    getattr(s, "scale_rate", math.nan),
                    getattr(s, "scale_rate_max_before", math.nan),
                )
                if (
                    getattr(s, "scale_rate_count", 0) >= self.min_history
                    and is_finite_number(rate)
                    and is_finite_number(before)
                    and rate > self.min_rate
                    and rate > self.factor * before
                ):
                    jumped.append((rate, before, key))
        if not jumped:
            return []
        rate, before, key = max(jumped)
        ratio_per_10 = math.exp(10 * rate)
        return [
            Breach(
                "scale",
                (key,),
                {"rate_per_step": rate, "max_before": before, "n_matrices": len(jumped)},
                f"{short_name(key, snapshot)} scale changes x{ratio_per_10:.2f} per 10 steps, "
                f"{rate / before if before > 0 else math.inf:.0f}x faster than at any earlier snapshot "
                f"({len(jumped)} matrices jumped): a learning-rate spike, a corrupted or re-initialised layer, or a "
                f"bad restore; {ACTIONS['spike']}.",
            )
        ]


class ShapeDriftUp(Rule):
    """The median shape k of a class rises above where its matrices started: the class median of
    ``drift_from_first`` ≥ ``min_drift`` and the median of ``drift_from_first_z`` ≥ ``z``. Selection and
    Transmission by default.

    In the benchmark, at a learning rate too high for the attention, W_q/W_k and the FFN's k jump *up* within 10-30
    steps, before or as the attention entropy collapses; healthy runs' class-median drift stays ≤ 0.028 (≤ 1.9σ).
    Initialisation-independent (each matrix is compared with its own first fit). With qk-norm the same drift comes
    with no collapse (it follows the learning rate, not the mechanism): the breach is ``qk_norm_level`` (info) there.
    """

    name = "shape_drift_up"
    level = "warning"
    cooldown = 1000

    def __init__(
        self,
        classes: Sequence[str] = ("selection", "transmission"),
        min_drift: float = 0.05,
        z: float = 4.0,
        qk_norm_level: str = "info",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.classes = tuple(classes)
        self.min_drift = float(min_drift)
        self.z = float(z)
        self.qk_norm_level = check_level(qk_norm_level)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        stats = getattr(snapshot, "matrices", {}) or {}
        qk_norm = bool(getattr(snapshot, "attention_qk_norm", None))
        breaches = []
        for klass in self.classes:
            drifts = []
            for key in members_of(snapshot, klass):
                s = stats.get(key)
                d, z = getattr(s, "drift_from_first", math.nan), getattr(s, "drift_from_first_z", math.nan)
                if is_finite_number(d) and is_finite_number(z):
                    drifts.append((d, z, key))
            if len(drifts) < 2:
                continue
            med_drift = statistics.median(d for d, _, _ in drifts)
            med_z = statistics.median(z for _, z, _ in drifts)
            if med_drift < self.min_drift or med_z < self.z:
                continue
            top = max(drifts, key=lambda t: t[1])
            advice = (
                "with qk-norm this follows the learning rate without collapsing the attention (info only)"
                if qk_norm
                else f"this went with a learning rate too high for the attention in the benchmark; {ACTIONS['lr']}"
            )
            breaches.append(
                Breach(
                    klass,
                    tuple(k for _, _, k in drifts),
                    {"median_drift": med_drift, "median_z": med_z, "max_z": top[1]},
                    f"{klass.capitalize()} k rose {med_drift:+.3f} above its start (median of {len(drifts)} "
                    f"matrices, {med_z:+.1f} sigma; most: {short_name(top[2], snapshot)} {top[1]:+.1f} sigma): "
                    f"{advice}.",
                    level=self.qk_norm_level if qk_norm else None,
                )
            )
        return breaches

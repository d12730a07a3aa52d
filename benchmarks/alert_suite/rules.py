"""Proposed calibrated alert rules (prototypes as ``Rule`` subclasses; thresholds from the calibration half).

What each rule reads per snapshot, beyond what the monitor stores today:

- ``k_first`` / ``k_first_stderr`` per matrix (the fit at the matrix's first snapshot; the monitor keeps only
  λ_first). In the replay it comes from ``snapshot.first``; the helper :func:`first_fit` reads
  ``snapshot.matrices[key].k_first`` / ``.k_first_stderr`` first, so the rules work unchanged once the monitor adds
  those fields.
- λ at the previous snapshot (for the per-step scale rate). The prototype keeps it inside the rule (fine for a
  replay, lost on resume); the monitor should add ``scale_prev`` and ``scale_prev_step`` (or ``scale_rate``,
  d ln λ / d step since the previous snapshot) to MatrixStats and its resumable state.
- per-head weights-only logit bounds (``snapshot.extras["qk_head_norms"]``, from the run's signals in the replay):
  the monitor would compute them from W_q, W_k (and the q/k-norm gains) at each snapshot.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, ClassVar

from weibull_monitor import Breach, Rule, default_rules

NAN = math.nan
#: The package's built-in rule classes, found through the stable ``default_rules()`` (their module is moving).
BUILTIN = {type(rule).__name__: type(rule) for rule in default_rules()}
ACTIONS = {
    "lr": "lower the peak learning rate, lengthen the warm-up, or add qk-norm",
    "spike": "check the learning-rate schedule and the last checkpoint restore; roll back if the loss jumped",
    "wd": "check weight decay on the attention projections (it is 0 or tiny) and the learning rate",
}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def members(snapshot: Any, classes: Sequence[str]) -> list[str]:
    """Ok fits of the given classes that count in the class aggregates (each weight element once)."""
    stats = getattr(snapshot, "matrices", {}) or {}
    out = []
    for key, role in snapshot.roles.items():
        fit = snapshot.fits.get(key)
        if role is None or role.klass not in classes or fit is None or not fit.ok:
            continue
        if key in stats and not stats[key].in_aggregates:
            continue
        out.append(key)
    return out


def short(snapshot: Any, key: str) -> str:
    stats = getattr(snapshot, "matrices", {}) or {}
    metric = getattr(stats.get(key), "metric_key", None)
    return metric.removeprefix("weibull/k/") if metric else key


def first_fit(snapshot: Any, key: str) -> tuple[float, float]:
    """(k, k_stderr) of the matrix at its first snapshot: the monitor's field when it has one, else the replay's."""
    stats = (getattr(snapshot, "matrices", {}) or {}).get(key)
    k0 = getattr(stats, "k_first", None)
    if _finite(k0):
        return float(k0), float(getattr(stats, "k_first_stderr", NAN))
    fit = (getattr(snapshot, "first", {}) or {}).get(key)
    return (fit.k, fit.k_stderr) if fit is not None else (NAN, NAN)


def drift_from_first(snapshot: Any, key: str) -> tuple[float, float]:
    """(k − k_first, that drift in standard errors of the difference of two independent fits)."""
    fit = snapshot.fits[key]
    k0, se0 = first_fit(snapshot, key)
    if not (_finite(k0) and _finite(fit.k)):
        return NAN, NAN
    se = math.hypot(fit.k_stderr if _finite(fit.k_stderr) else 0.0, se0 if _finite(se0) else 0.0)
    drift = fit.k - k0
    return drift, (drift / se if se > 0 else NAN)


# --------------------------------------------------------------------------------------------- rules


class ShapeDriftUp(Rule):
    """The median shape k of a class rises above where its matrices started, by more than ``min_drift`` and
    ``z`` standard errors (per-matrix drifts from each matrix's first snapshot, then the class median).

    Evidence (docs/alerts.md): at a learning rate too high for the attention logits, W_q/W_k (and the FFN) k jump
    *upwards* within the first 10-30 steps, before or as the attention entropy collapses; in healthy runs the
    median drift stays within a few standard errors. Initialisation-independent (PyTorch's uniform init starts at
    1.36, HF's Gaussian at 1.2054: only the change counts).
    """

    name = "shape_drift_up"
    level = "warning"
    patience = 1
    cooldown = 1000

    def __init__(
        self,
        classes: Sequence[str] = ("selection", "transmission"),
        min_drift: float = 0.05,
        z: float = 4.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.classes = tuple(classes)
        self.min_drift = float(min_drift)
        self.z = float(z)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        breaches = []
        for klass in self.classes:
            keys = members(snapshot, (klass,))
            drifts = [(d, z, key) for key in keys for d, z in [drift_from_first(snapshot, key)] if _finite(z)]
            if len(drifts) < 2:
                continue
            med_drift = statistics.median(d for d, _, _ in drifts)
            med_z = statistics.median(z for _, z, _ in drifts)
            if med_drift < self.min_drift or med_z < self.z:
                continue
            top = max(drifts, key=lambda t: t[1])
            breaches.append(
                Breach(
                    klass,
                    tuple(k for _, _, k in drifts),
                    {"median_drift": med_drift, "median_z": med_z, "max_z": top[1]},
                    f"{klass.capitalize()} k rose {med_drift:+.3f} above its start (median of {len(drifts)} "
                    f"matrices, {med_z:+.1f} sigma; most: {short(snapshot, top[2])} {top[1]:+.1f} sigma). This went "
                    f"with a learning rate too high for the attention (entropy collapse, stalled loss) in the "
                    f"benchmark: {ACTIONS['lr']}.",
                )
            )
        return breaches


class ScaleJump(Rule):
    """The scale λ of a matrix changes abruptly: |d ln λ / d step| since the previous snapshot is above an absolute
    floor (``min_ratio_per_10`` per 10 steps, ×1.5 by default) *and* ``factor`` × the fastest change that matrix
    showed at any earlier snapshot of the run (at least ``min_history`` earlier rates are needed).

    Relative to the run's own history because early training (and a warm-up at a high but survivable lr, as in the
    qk-norm controls) legitimately moves λ fast: in the benchmark's healthy runs λ changes at most ×1.23 per 10 steps,
    always in the first 50 steps, and later at most ×1.08; a learning-rate spike or a corrupted layer then moves it
    ×2.4-8 within one interval. Only Selection / Transmission / Value matrices.
    The prototype keeps the previous λ and the running maximum itself (the monitor should store them per matrix).
    """

    name = "scale_jump"
    level = "warning"
    patience = 1
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
        self._prev: dict[str, tuple[int, float]] = {}
        self._history: dict[str, list[float]] = {}

    def evaluate(self, snapshot: Any) -> list[Breach]:
        step = int(snapshot.step)
        worst = None
        n_over = 0
        for key in members(snapshot, self.classes):
            scale = snapshot.fits[key].scale
            if not (_finite(scale) and scale > 0):
                continue
            prev = self._prev.get(key)
            self._prev[key] = (step, scale)
            if prev is None or step <= prev[0]:
                continue
            rate = abs(math.log(scale / prev[1])) / (step - prev[0])
            history = self._history.setdefault(key, [])
            if (
                len(history) >= self.min_history
                and rate > self.min_rate
                and rate > self.factor * max(history)
            ):
                n_over += 1
                if worst is None or rate > worst[0]:
                    worst = (rate, key, scale / prev[1], step - prev[0], max(history))
            history.append(rate)
        if worst is None:
            return []
        rate, key, ratio, steps, before = worst
        return [
            Breach(
                "scale",
                (key,),
                {
                    "rate_per_step": rate,
                    "ratio": ratio,
                    "steps": steps,
                    "n_matrices": n_over,
                    "max_before": before,
                },
                f"{short(snapshot, key)} scale changed x{ratio:.2f} in {steps} steps, {rate / before:.0f}x faster than "
                f"at any earlier snapshot ({n_over} matrices jumped): a learning-rate spike, a corrupted or "
                f"re-initialised layer, or a bad restore. {ACTIONS['spike']}.",
            )
        ]


class AttentionLogitBound(Rule):
    """Weights-only: the largest per-head attention-logit bound grew ``max_growth`` × above its value at the first
    snapshot *and* exceeds ``min_bound`` (in logits). The bound is the largest logit a unit-RMS input can produce
    through one head: ‖diag(g) W_q^hᵀ W_k^h diag(g)‖₂ · scaling · hidden (g: the gain of the norm feeding attention),
    or, with qk-norm, scaling · head_dim · max|g_q| · max|g_k|. Needs per-head figures in the snapshot
    (``extras['qk_head_norms']`` in the replay; the monitor would compute them at each snapshot from W_q, W_k and the
    norm gains: a few small QR/SVDs per layer).

    Why both conditions: growth makes it independent of the initial scale; the absolute floor keeps it quiet where
    no logit can reach one-hot attention (healthy runs of the benchmark peak at 74, collapsing ones pass 200-500
    before or as the entropy collapses).
    """

    name = "attention_logit_bound"
    level = "warning"
    patience = 1
    cooldown = 1000

    def __init__(self, max_growth: float = 50.0, min_bound: float = 100.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_growth = float(max_growth)
        self.min_bound = float(min_bound)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        extras = getattr(snapshot, "extras", {}) or {}
        rows, first = extras.get("qk_head_norms"), extras.get("qk_head_norms_first")
        if not rows or not first:
            return []
        worst = None
        for layer, heads in enumerate(rows):
            for head, value in enumerate(heads):
                base = first[layer][head]
                if not base > 0:
                    continue
                growth = value / base if _finite(value) else math.inf
                over = value > self.min_bound or not _finite(value)
                if over and (worst is None or growth > worst[0]):
                    worst = (growth, layer, head, value)
        if worst is None or not worst[0] > self.max_growth:
            return []
        growth, layer, head, value = worst
        return [
            Breach(
                "heads",
                (),
                {"growth": growth, "bound": value, "layer": layer, "head": head},
                f"attention-logit bound of L{layer} head {head} is {value:.0f} (x{growth:.0f} since the first snapshot): "
                f"its W_q/W_k can now drive the attention to one-hot (entropy collapse). {ACTIONS['lr']}.",
            )
        ]


class QKNormAware:
    """Mixin: the breach is reported at ``qk_norm_level`` (info) when the model's attention has qk-norm, where the
    shape drift that precedes entropy collapse in models without it follows the learning rate only (benchmark
    controls: same drift, no collapse). Reads ``snapshot.attention_qk_norm`` (proposed Snapshot field) or
    ``snapshot.extras['qk_norm']`` (replay)."""

    qk_norm_level = "info"

    @staticmethod
    def has_qk_norm(snapshot: Any) -> bool:
        flag = getattr(snapshot, "attention_qk_norm", None)
        if flag is None:
            flag = (getattr(snapshot, "extras", {}) or {}).get("qk_norm")
        return bool(flag)


class ShapeDriftUpChecked(QKNormAware, ShapeDriftUp):
    """:class:`ShapeDriftUp` at warning without qk-norm, at info with it."""

    def evaluate(self, snapshot: Any) -> list[Breach]:
        breaches = super().evaluate(snapshot)
        if breaches and self.has_qk_norm(snapshot):
            return [
                Breach(
                    b.key,
                    b.matrices,
                    b.values,
                    b.message + " (qk-norm bounds the logits: info only)",
                    self.qk_norm_level,
                )
                for b in breaches
            ]
        return breaches


class SelectionCollapseByKind(Rule):
    """Selection median k below the threshold of the model's attention kind, by more than ``z`` standard errors of
    the median (warning); one Selection matrix below its kind's matrix threshold (critical). Thresholds sit below
    the paper's healthy terminal range of each kind, so a healthy model of that kind never trips them:

    - separate Q/K ("deep", healthy 0.76-0.99): median < 0.70, a matrix < 0.50;
    - GQA / MQA ("mild", healthy 1.10-1.16): median < 1.00, a matrix < 0.80;
    - fused QKV ("transitional", healthy 1.05-1.18, falling with T/τ): median < 0.90, a matrix < 0.70;
    - unknown kind: the separate-Q/K thresholds (the most permissive).
    """

    name = "selection_collapse"
    level = "warning"
    patience = 2
    cooldown = 1000
    THRESHOLDS: ClassVar[dict[str | None, tuple[float, float]]] = {
        "deep": (0.70, 0.50),
        "mild": (1.00, 0.80),
        "transitional": (0.90, 0.70),
        None: (0.70, 0.50),
    }

    def __init__(self, z: float = 3.0, matrix_level: str = "critical", **kw: Any) -> None:
        super().__init__(**kw)
        self.z = float(z)
        self.matrix_level = matrix_level

    def evaluate(self, snapshot: Any) -> list[Breach]:
        keys = members(snapshot, ("selection",))
        if not keys:
            return []
        expectation = getattr(snapshot, "expectation", None)
        median_thr, matrix_thr = self.THRESHOLDS.get(expectation, self.THRESHOLDS[None])
        ks = {key: snapshot.fits[key].k for key in keys}
        ses = [snapshot.fits[key].k_stderr for key in keys if _finite(snapshot.fits[key].k_stderr)]
        se_median = 1.2533 * statistics.median(ses) / math.sqrt(len(ses)) if ses else 0.0
        median = statistics.median(ks.values())
        breaches = []
        kind = expectation or "unknown"
        if median + self.z * se_median < median_thr:
            breaches.append(
                Breach(
                    "median",
                    tuple(keys),
                    {"k_median": median, "threshold": median_thr, "stderr": se_median},
                    f"Selection median k {median:.3f} < {median_thr:.2f}, below the healthy range of {kind} "
                    f"selection: W_q/W_k concentrate on few directions (low rank). Check the attention entropy; "
                    f"{ACTIONS['lr']}.",
                )
            )
        low = sorted(
            (k, key) for key, k in ks.items() if k + self.z * snapshot.fits[key].k_stderr < matrix_thr
        )
        if low:
            k_min, key_min = low[0]
            breaches.append(
                Breach(
                    "matrix",
                    tuple(key for _, key in low),
                    {"k_min": k_min, "threshold": matrix_thr, "n_matrices": len(low)},
                    f"{len(low)} Selection matrices below k {matrix_thr:.2f} ({kind}), lowest "
                    f"{short(snapshot, key_min)} k={k_min:.3f}: a collapsed W_q/W_k. {ACTIONS['lr']}.",
                    level=self.matrix_level,
                )
            )
        return breaches


class SelectionDepartureFromStart(Rule):
    """Info, once: the first significant departure of Selection matrices from *their own first snapshot*
    (|k − k_first| >= ``min_drift`` and >= ``z`` standard errors): works for any initialisation."""

    name = "selection_departure_onset"
    level = "info"
    once = True

    def __init__(self, z: float = 5.0, min_drift: float = 0.01, **kw: Any) -> None:
        super().__init__(**kw)
        self.z = float(z)
        self.min_drift = float(min_drift)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        departed = []
        for key in members(snapshot, ("selection",)):
            drift, z = drift_from_first(snapshot, key)
            if _finite(z) and abs(drift) >= self.min_drift and abs(z) >= self.z:
                departed.append((abs(z), key, drift, z))
        if not departed:
            return []
        departed.sort(reverse=True)
        _, key, drift, z = departed[0]
        return [
            Breach(
                "selection",
                tuple(k for _, k, _, _ in departed),
                {"n_matrices": len(departed), "drift": drift, "drift_z": z},
                f"Selection leaves its starting shape: {len(departed)} matrices significant, strongest "
                f"{short(snapshot, key)} drift {drift:+.3f} ({z:+.1f} sigma)",
            )
        ]


class TransmissionBandWhenTrained(BUILTIN["TransmissionOutOfBand"]):  # type: ignore[misc]
    """The paper's terminal Transmission band (k in [1.18, 1.21]), checked only once the run is comparable to the
    trained models it comes from (T/τ >= ``min_T_over_tau``), and reported as info: science.md §3 lists healthy
    exceptions (OLMo-1's W_o at 1.041), and in the benchmark the band is left by healthy runs in progress and by
    high-lr runs with and without qk-norm alike."""

    level = "info"

    def __init__(self, min_T_over_tau: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.min_T_over_tau = float(min_T_over_tau)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        t = getattr(snapshot, "T_over_tau", None)
        if not _finite(t) or t < self.min_T_over_tau:
            return []
        return super().evaluate(snapshot)


def proposed_rules() -> list[Any]:
    """The calibrated rule set (docs/alerts.md §5). Warnings: attention_logit_bound, scale_jump, shape_drift_up
    (without qk-norm), non_weibull_shape (Selection/Transmission/Value), selection_collapse (by attention kind);
    critical: non_finite_weights, a collapsed Selection matrix; info: the paper's Transmission band once T/τ >= 1,
    scale growth since the first snapshot, the departure onset."""
    return [
        AttentionLogitBound(),
        ScaleJump(),
        ShapeDriftUpChecked(),
        SelectionCollapseByKind(),
        SelectionDepartureFromStart(),
        BUILTIN["NonWeibullShape"](classes=("selection", "transmission", "value"), level="info"),
        TransmissionBandWhenTrained(),
        BUILTIN["ScaleRunaway"](max_over_expectation=None, level="info"),
        BUILTIN["NonFiniteWeights"](),
    ]

"""The built-in alert rules: what breaches in one snapshot (the engine decides when a breach becomes an alert).

They read ``snapshot.fits`` / ``snapshot.roles`` / ``snapshot.matrices`` (per-matrix dynamics, see
:class:`weibull_monitor.snapshot.dynamics.MatrixStats`) / ``snapshot.aggregates``; matrices whose fit is not ok are
ignored except by NonFiniteWeights. docs/alerts.md says what each detects and the evidence behind its thresholds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from weibull_monitor.alerts.advice import ACTIONS, short_name
from weibull_monitor.alerts.early import AttentionLogitBound, ScaleJump, ShapeDriftUp
from weibull_monitor.alerts.engine import Breach, Rule, check_level
from weibull_monitor.models import expectations
from weibull_monitor.snapshot.classes import members_of
from weibull_monitor.snapshot.dynamics import is_finite_number, median_stderr

__all__ = [
    "AttentionLogitBound",
    "NonFiniteWeights",
    "NonWeibullShape",
    "ScaleJump",
    "ScaleRunaway",
    "SelectionCollapse",
    "SelectionDepartureOnset",
    "ShapeDriftUp",
    "TransmissionOutOfBand",
    "default_rules",
]


_short = short_name


def _expectation_note(snapshot: Any, klass: str) -> str:
    band = expectations.expected_band(klass, getattr(snapshot, "attention_kind", None))
    return f" (paper: {band})" if band else ""


class SelectionCollapse(Rule):
    """Selection (W_q, W_k) collapsed below the healthy range of the model's attention kind: the median k plus
    ``z`` standard errors of the median below the kind's median threshold (warning), or one matrix's k plus ``z``
    standard errors below the kind's matrix threshold (``matrix_level``, critical by default).

    Thresholds (median, one matrix) sit below the paper's healthy terminal range of each kind, so a healthy model of
    that kind never trips them: separate Q/K ("deep", healthy 0.76-0.99) 0.70 / 0.50; GQA or MQA ("mild",
    1.10-1.16) 1.00 / 0.80; fused QKV ("transitional", 1.05-1.18) 0.90 / 0.70; unknown kind: the separate-Q/K ones
    (the most permissive). It describes a collapsed W_q/W_k; in the benchmark it fires only after divergence, late:
    the early warnings are :mod:`weibull_monitor.alerts.early`.
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

    def __init__(
        self,
        thresholds: Mapping[str | None, tuple[float, float]] | None = None,
        z: float = 3.0,
        matrix_level: str = "critical",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.thresholds = {**self.THRESHOLDS, **(thresholds or {})}
        self.z = float(z)
        self.matrix_level = check_level(matrix_level)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        members = members_of(snapshot, "selection")
        if not members:
            return []
        expectation = getattr(snapshot, "expectation", None)
        median_thr, matrix_thr = self.thresholds.get(expectation, self.thresholds[None])
        kind = expectation or "unknown"
        fits = {key: snapshot.fits[key] for key in members}
        se = median_stderr(fit.k_stderr for fit in fits.values())
        margin = self.z * se if is_finite_number(se) else 0.0
        breaches = []
        median = statistics.median(fit.k for fit in fits.values())
        if median + margin < median_thr:
            breaches.append(
                Breach(
                    "median",
                    tuple(members),
                    {"k_median": median, "threshold": median_thr, "stderr": se, "n_matrices": len(members)},
                    f"Selection median k {median:.3f} < {median_thr:.2f} over {len(members)} matrices, below the "
                    f"healthy range of {kind} selection{_expectation_note(snapshot, 'selection')}: W_q/W_k "
                    f"concentrate on few directions. Check the attention entropy; {ACTIONS['lr']}.",
                )
            )
        low = sorted(
            (fit.k, key)
            for key, fit in fits.items()
            if fit.k + self.z * (fit.k_stderr if is_finite_number(fit.k_stderr) else 0.0) < matrix_thr
        )
        if low:
            k_min, key_min = low[0]
            breaches.append(
                Breach(
                    "matrix",
                    tuple(key for _, key in low),
                    {"k_min": k_min, "threshold": matrix_thr, "n_matrices": len(low)},
                    f"{len(low)} Selection matrices below k {matrix_thr:.2f} ({kind}), lowest "
                    f"{_short(key_min, snapshot)} k={k_min:.3f}: a collapsed W_q/W_k. Check the attention entropy; "
                    f"{ACTIONS['lr']}.",
                    level=self.matrix_level,
                )
            )
        return breaches


class SelectionDepartureOnset(Rule):
    """Info, once: the first significant departure of Selection matrices from *their own first snapshot*
    (|k - k_first| >= ``min_drift`` and >= ``z`` standard errors of the difference). Any initialisation works:
    PyTorch's uniform default starts at k = 1.36, not at the Gaussian anchor."""

    name = "selection_departure_onset"
    level = "info"
    once = True

    def __init__(self, z: float = 5.0, min_drift: float = expectations.AT_INIT_TOLERANCE, **kw: Any) -> None:
        super().__init__(**kw)
        self.z = float(z)
        self.min_drift = float(min_drift)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        stats = getattr(snapshot, "matrices", {}) or {}
        departed = []
        for key in members_of(snapshot, "selection"):
            s = stats.get(key)
            drift, z = getattr(s, "drift_from_first", math.nan), getattr(s, "drift_from_first_z", math.nan)
            if not is_finite_number(drift) or not is_finite_number(z):
                continue
            if abs(drift) >= self.min_drift and abs(z) >= self.z:
                departed.append((abs(z), key, drift, z))
        if not departed:
            return []
        departed.sort(reverse=True)
        _, key, drift, z = departed[0]
        return [
            Breach(
                "selection",
                tuple(k for _, k, _, _ in departed),
                {"n_matrices": len(departed), "drift": drift, "drift_z": z, "k": snapshot.fits[key].k},
                f"Selection leaves its starting shape: {len(departed)} matrices significant, strongest "
                f"{_short(key, snapshot)} k={snapshot.fits[key].k:.3f} (drift {drift:+.3f} since its first "
                f"snapshot, {z:+.1f} sigma)",
            )
        ]


class TransmissionOutOfBand(Rule):
    """Info: the Transmission (FFN, W_o) median k outside the paper's terminal ``band`` by more than ``z`` standard
    errors of the median, checked only once the run is comparable to the trained models the band comes from
    (T/τ >= ``min_T_over_tau``; a snapshot without T/τ is not checked). The band describes trained models, not a
    run in progress, and has healthy exceptions (science.md §3: OLMo-1's W_o at 1.041)."""

    name = "transmission_out_of_band"
    level = "info"
    patience = 3
    cooldown = 1000

    def __init__(
        self,
        band: tuple[float, float] = expectations.TRANSMISSION_BAND,
        z: float = 3.0,
        min_T_over_tau: float | None = 1.0,
        **kw: Any,
    ):
        super().__init__(**kw)
        self.min_T_over_tau = None if min_T_over_tau is None else float(min_T_over_tau)
        low, high = band
        if not low < high:
            raise ValueError(f"band must be (low, high) with low < high, got {band}")
        self.band = (float(low), float(high))
        self.z = float(z)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        t_over_tau = getattr(snapshot, "T_over_tau", None)
        if self.min_T_over_tau is not None and not (
            is_finite_number(t_over_tau) and t_over_tau >= self.min_T_over_tau
        ):
            return []
        members = members_of(snapshot, "transmission")
        if not members:
            return []
        median = statistics.median(snapshot.fits[key].k for key in members)
        se = median_stderr(snapshot.fits[key].k_stderr for key in members)
        margin = self.z * se if is_finite_number(se) else 0.0
        low, high = self.band
        if low - margin <= median <= high + margin:
            return []
        return [
            Breach(
                "median",
                tuple(members),
                {"k_median": median, "band_low": low, "band_high": high, "stderr": se},
                f"Transmission median k {median:.4f} outside [{low:.2f}, {high:.2f}] "
                f"(+-{margin:.4f} noise allowance) over {len(members)} matrices at T/tau "
                f"{t_over_tau if is_finite_number(t_over_tau) else math.nan:.3g}",
            )
        ]


class NonWeibullShape(Rule):
    """Info: a matrix whose middle-80% Weibull regression has R² below ``r2_min`` left the Weibull family; the
    alert carries distribution-free quantile ratios instead (Q90/Q10, Q99/Q50, P99.9/P50). Selection, Transmission
    and Value by default (``classes=None``: every class): an embedding whose unused rows decay is expected to leave
    the family, and in the benchmark the rule never fired before another rule on a failing run."""

    name = "non_weibull_shape"
    level = "info"
    cooldown = 1000

    def __init__(
        self,
        r2_min: float = expectations.R2_WEIBULL_MIN,
        classes: Sequence[str] | None = ("selection", "transmission", "value"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.r2_min = float(r2_min)
        self.classes = None if classes is None else tuple(classes)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        breaches = []
        for key, fit in snapshot.fits.items():
            if not fit.ok or not is_finite_number(fit.r2) or fit.r2 >= self.r2_min:
                continue
            role = snapshot.roles.get(key)
            if self.classes is not None and (role is None or role.klass not in self.classes):
                continue
            ratios = {
                name: float(getattr(fit, name, math.nan))
                for name in ("q90_over_q10", "q99_over_q50", "q999_over_q50")
            }
            breaches.append(
                Breach(
                    key,
                    (key,),
                    {"r2": fit.r2, "k": fit.k, "r2_min": self.r2_min, **ratios},
                    f"{_short(key, snapshot)} is not Weibull: R2 {fit.r2:.3f} < {self.r2_min:.2f}; "
                    f"Q90/Q10 {ratios['q90_over_q10']:.3g}, Q99/Q50 {ratios['q99_over_q50']:.3g}, "
                    f"P99.9/P50 {ratios['q999_over_q50']:.3g}",
                )
            )
        return breaches


class ScaleRunaway(Rule):
    """Info: a matrix's scale λ grew more than ``max_growth`` × its value at the first snapshot (a progress figure:
    in the benchmark it flagged every failing run but in time in 2 of 34, and healthy runs cross it too). The test
    against Pythia's λ/√(η/λ_wd) constant is gone: the paper says it does not carry across families."""

    name = "scale_runaway"
    level = "info"
    patience = 2
    cooldown = 1000

    def __init__(
        self,
        max_growth: float = 5.0,
        classes: Sequence[str] = ("selection", "transmission", "value", "mixed"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.max_growth = float(max_growth)
        self.classes = tuple(classes)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        stats = getattr(snapshot, "matrices", {}) or {}
        breaches = []
        for key, fit in snapshot.fits.items():
            role, s = snapshot.roles.get(key), stats.get(key)
            if not fit.ok or role is None or role.klass not in self.classes or s is None:
                continue
            growth = s.scale_growth
            if not (is_finite_number(growth) and growth > self.max_growth):
                continue
            breaches.append(
                Breach(
                    key,
                    (key,),
                    {"scale": fit.scale, "scale_growth": growth},
                    f"{_short(key, snapshot)} scale grew {growth:.2f}x since the first snapshot (> {self.max_growth:g}x)",
                )
            )
        return breaches


class NonFiniteWeights(Rule):
    """Any NaN or ±inf element in a monitored matrix: critical, at once (no patience, no cooldown)."""

    name = "non_finite_weights"
    level = "critical"

    def evaluate(self, snapshot: Any) -> list[Breach]:
        bad = {key: fit.n_nonfinite for key, fit in snapshot.fits.items() if fit.n_nonfinite > 0}
        if not bad:
            return []
        worst = max(bad, key=bad.__getitem__)
        return [
            Breach(
                "weights",
                tuple(sorted(bad)),
                {"n_matrices": len(bad), "n_nonfinite": sum(bad.values())},
                f"{sum(bad.values())} non-finite weights in {len(bad)} matrices, most in "
                f"{_short(worst, snapshot)} ({bad[worst]}): {ACTIONS['diverged']}.",
            )
        ]


def default_rules() -> list[Rule]:
    """A fresh instance of every built-in rule with its default thresholds (docs/alerts.md): warnings
    attention_logit_bound, scale_jump, shape_drift_up (info with qk-norm), selection_collapse (critical for one
    matrix); critical non_finite_weights; info selection_departure_onset, transmission_out_of_band (T/τ >= 1),
    non_weibull_shape, scale_runaway."""
    return [
        AttentionLogitBound(),
        ScaleJump(),
        ShapeDriftUp(),
        SelectionCollapse(),
        SelectionDepartureOnset(),
        TransmissionOutOfBand(),
        NonWeibullShape(),
        ScaleRunaway(),
        NonFiniteWeights(),
    ]

"""The built-in alert rules: what breaches in one snapshot (the engine decides when a breach becomes an alert).

They read ``snapshot.fits`` / ``snapshot.roles`` / ``snapshot.matrices`` (per-matrix dynamics, see
:class:`weibull_monitor.snapshot.dynamics.MatrixStats`) / ``snapshot.aggregates``; matrices whose fit is not ok are
ignored except by NonFiniteWeights. docs/alerts.md says what each detects and the evidence behind its thresholds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from weibull_monitor.alerts.engine import Breach, Rule, check_level
from weibull_monitor.models import expectations
from weibull_monitor.snapshot import keys
from weibull_monitor.snapshot.classes import members_of
from weibull_monitor.snapshot.dynamics import is_finite_number, median_stderr

__all__ = [
    "NonFiniteWeights",
    "NonWeibullShape",
    "ScaleRunaway",
    "SelectionCollapse",
    "SelectionDepartureOnset",
    "TransmissionOutOfBand",
    "default_rules",
]


def _short(key: str, snapshot: Any) -> str:
    stats = getattr(snapshot, "matrices", {}) or {}
    return keys.short_matrix_name(getattr(stats.get(key), "metric_key", None), key)


def _expectation_note(snapshot: Any, klass: str) -> str:
    band = expectations.expected_band(klass, getattr(snapshot, "attention_kind", None))
    return f" (paper: {band})" if band else ""


class SelectionCollapse(Rule):
    """Selection (W_q, W_k) median k below ``threshold`` (warning), or any single Selection matrix below
    ``matrix_threshold`` (``matrix_level``, critical by default).

    Separate-Q/K models legitimately reach medians of 0.76-0.99 ("deep selection"); the message quotes the
    expectation for the model's attention kind so the reader can judge.
    """

    name = "selection_collapse"
    level = "warning"
    patience = 2
    cooldown = 1000

    def __init__(
        self,
        threshold: float = expectations.STRONG_SELECTION_BELOW,
        matrix_threshold: float = 0.6,
        matrix_level: str = "critical",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.threshold = float(threshold)
        self.matrix_threshold = float(matrix_threshold)
        self.matrix_level = check_level(matrix_level)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        members = members_of(snapshot, "selection")
        if not members:
            return []
        ks = {key: snapshot.fits[key].k for key in members}
        breaches = []
        median = statistics.median(ks.values())
        if median < self.threshold:
            breaches.append(
                Breach(
                    "median",
                    tuple(members),
                    {"k_median": median, "threshold": self.threshold, "n_matrices": len(members)},
                    f"Selection median k {median:.3f} < {self.threshold:.2f} over {len(members)} matrices"
                    + _expectation_note(snapshot, "selection"),
                )
            )
        low = sorted((k, key) for key, k in ks.items() if k < self.matrix_threshold)
        if low:
            k_min, key_min = low[0]
            breaches.append(
                Breach(
                    "matrix",
                    tuple(key for _, key in low),
                    {"k_min": k_min, "threshold": self.matrix_threshold, "n_matrices": len(low)},
                    f"{len(low)} Selection matrices below k {self.matrix_threshold:.2f}, lowest "
                    f"{_short(key_min, snapshot)} k={k_min:.3f}",
                    level=self.matrix_level,
                )
            )
        return breaches


class SelectionDepartureOnset(Rule):
    """First statistically significant departure of Selection matrices from the Gaussian anchor (info, once).

    A matrix departs when |k - K_GAUSSIAN| >= ``min_drift`` and |drift| / k_stderr >= ``z``.
    """

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
            if s is None or not is_finite_number(s.drift) or not is_finite_number(s.drift_z):
                continue
            if abs(s.drift) >= self.min_drift and abs(s.drift_z) >= self.z:
                departed.append((abs(s.drift_z), key, s))
        if not departed:
            return []
        departed.sort(reverse=True)
        _, key, s = departed[0]
        return [
            Breach(
                "selection",
                tuple(k for _, k, _ in departed),
                {
                    "n_matrices": len(departed),
                    "drift": s.drift,
                    "drift_z": s.drift_z,
                    "k": snapshot.fits[key].k,
                },
                f"Selection leaves the Gaussian anchor: {len(departed)} matrices significant, strongest "
                f"{_short(key, snapshot)} k={snapshot.fits[key].k:.3f} (drift {s.drift:+.3f}, {s.drift_z:+.1f} sigma)",
            )
        ]


class TransmissionOutOfBand(Rule):
    """Transmission (FFN, W_o) median k outside ``band`` by more than ``z`` standard errors of the median."""

    name = "transmission_out_of_band"
    level = "warning"
    patience = 3
    cooldown = 1000

    def __init__(self, band: tuple[float, float] = expectations.TRANSMISSION_BAND, z: float = 3.0, **kw: Any):
        super().__init__(**kw)
        low, high = band
        if not low < high:
            raise ValueError(f"band must be (low, high) with low < high, got {band}")
        self.band = (float(low), float(high))
        self.z = float(z)

    def evaluate(self, snapshot: Any) -> list[Breach]:
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
                f"(+-{margin:.4f} noise allowance) over {len(members)} matrices",
            )
        ]


class NonWeibullShape(Rule):
    """A matrix whose middle-80% Weibull regression has R² below ``r2_min``: it left the Weibull family.
    The alert carries distribution-free quantile ratios instead (Q90/Q10, Q99/Q50, P99.9/P50)."""

    name = "non_weibull_shape"
    level = "warning"
    cooldown = 1000

    def __init__(
        self, r2_min: float = expectations.R2_WEIBULL_MIN, classes: Sequence[str] | None = None, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.r2_min = float(r2_min)
        self.classes = None if classes is None else tuple(classes)  # None: every class, embeddings included

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
    """Scale λ growing out of hand: λ/λ_first above ``max_growth``, or λ/√(η_peak/λ_wd) above
    ``max_over_expectation`` × ``expectation_constant`` (Pythia's 0.087 by default; families differ, so the
    multiple is generous). Matrices without weight decay skip the second test."""

    name = "scale_runaway"
    level = "warning"
    patience = 2
    cooldown = 1000

    def __init__(
        self,
        max_growth: float = 5.0,
        max_over_expectation: float | None = 10.0,
        expectation_constant: float = expectations.PYTHIA_SCALE_PER_SQRT_LR_WD,
        classes: Sequence[str] = ("selection", "transmission", "value", "mixed"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.max_growth = float(max_growth)
        self.max_over_expectation = None if max_over_expectation is None else float(max_over_expectation)
        self.expectation_constant = float(expectation_constant)
        self.classes = tuple(classes)

    def evaluate(self, snapshot: Any) -> list[Breach]:
        stats = getattr(snapshot, "matrices", {}) or {}
        breaches = []
        for key, fit in snapshot.fits.items():
            role, s = snapshot.roles.get(key), stats.get(key)
            if not fit.ok or role is None or role.klass not in self.classes or s is None:
                continue
            growth, ratio = s.scale_growth, s.scale_over_sqrt_peak_lr_wd
            limit = (
                None
                if self.max_over_expectation is None
                else self.max_over_expectation * self.expectation_constant
            )
            if is_finite_number(growth) and growth > self.max_growth:
                message = f"{_short(key, snapshot)} scale grew {growth:.2f}x since the first snapshot (> {self.max_growth:g}x)"
            elif limit is not None and is_finite_number(ratio) and ratio > limit:
                message = (
                    f"{_short(key, snapshot)} scale/sqrt(lr_peak/wd) = {ratio:.3g} > {limit:.3g} "
                    f"({self.max_over_expectation:g}x the expectation {self.expectation_constant:g})"
                )
            else:
                continue
            values = {"scale": fit.scale, "scale_growth": growth, "scale_over_sqrt_peak_lr_wd": ratio}
            breaches.append(
                Breach(key, (key,), {k: v for k, v in values.items() if is_finite_number(v)}, message)
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
                f"{_short(worst, snapshot)} ({bad[worst]})",
            )
        ]


def default_rules() -> list[Rule]:
    """A fresh instance of every built-in rule with its default thresholds."""
    return [
        SelectionCollapse(),
        SelectionDepartureOnset(),
        TransmissionOutOfBand(),
        NonWeibullShape(),
        ScaleRunaway(),
        NonFiniteWeights(),
    ]

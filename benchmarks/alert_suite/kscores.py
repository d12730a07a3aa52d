"""Continuous scores from the monitor's own snapshots (Weibull k and λ), swept like the baselines so that k-based
signals and the weights-only baselines are compared at equal false-alarm rates and by early AUROC."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .baselines import INF, Baseline, Series, _geom
from .rules import drift_from_first, members


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _median_drift_z(snapshots: Sequence[Any], klass: str) -> Series:
    steps, values = [], []
    for sn in snapshots:
        zs = [z for key in members(sn, (klass,)) for _, z in [drift_from_first(sn, key)] if _finite(z)]
        steps.append(sn.step)
        values.append(statistics.median(zs) if zs else math.nan)
    return Series(steps, values)


def selection_drift_up(snapshots: Sequence[Any]) -> Series:
    return _median_drift_z(snapshots, "selection")


def transmission_drift_up(snapshots: Sequence[Any]) -> Series:
    return _median_drift_z(snapshots, "transmission")


def scale_rate(snapshots: Sequence[Any]) -> Series:
    """max over Selection / Transmission / Value matrices of |d ln λ / d step| × 10 (change per 10 steps)."""
    steps, values = [], []
    prev: dict[str, tuple[int, float]] = {}
    for sn in snapshots:
        best = -INF
        for key in members(sn, ("selection", "transmission", "value")):
            scale = sn.fits[key].scale
            p = prev.get(key)
            if _finite(scale) and scale > 0:
                if p is not None and sn.step > p[0]:
                    best = max(best, 10 * abs(math.log(scale / p[1])) / (sn.step - p[0]))
                prev[key] = (sn.step, scale)
        if any(sn.fits[k].n_nonfinite for k in sn.fits):
            best = INF
        steps.append(sn.step)
        values.append(best)
    return Series(steps, values)


def scale_growth(snapshots: Sequence[Any]) -> Series:
    """max over Selection / Transmission / Value matrices of λ / λ_first (the built-in ScaleRunaway's figure)."""
    steps, values = [], []
    for sn in snapshots:
        g = [sn.matrices[k].scale_growth for k in members(sn, ("selection", "transmission", "value"))]
        g = [x for x in g if _finite(x)]
        steps.append(sn.step)
        values.append(max(g) if g else math.nan)
    return Series(steps, values)


def selection_k_low(snapshots: Sequence[Any]) -> Series:
    """− median Selection k (higher = lower k), the built-in SelectionCollapse's figure."""
    steps, values = [], []
    for sn in snapshots:
        ks = [sn.fits[k].k for k in members(sn, ("selection",))]
        steps.append(sn.step)
        values.append(-statistics.median(ks) if ks else math.nan)
    return Series(steps, values)


KSCORES = (
    Baseline(
        "k: Selection drift up (z)",
        selection_drift_up,
        True,
        True,
        None,
        [*_geom(1.0, 200.0, 60), INF],
        "snapshots",
    ),
    Baseline(
        "k: Transmission drift up (z)",
        transmission_drift_up,
        True,
        True,
        None,
        [*_geom(1.0, 200.0, 60), INF],
        "snapshots",
    ),
    Baseline(
        "λ: scale rate (per 10 steps)",
        scale_rate,
        True,
        True,
        None,
        [*_geom(0.01, 5.0, 60), INF],
        "snapshots",
    ),
    Baseline("λ: scale growth", scale_growth, True, True, 5.0, [*_geom(1.2, 100.0, 60), INF], "snapshots"),
    Baseline(
        "k: Selection median low (-k)",
        selection_k_low,
        True,
        True,
        -0.95,
        [-x / 100 for x in range(140, 40, -2)] + [INF],
        "snapshots",
    ),
)

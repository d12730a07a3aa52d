"""Helpers the k/λ score baselines share with the rules, and the rule set the report scores.

The prototype rules calibrated and frozen on the calibration half (commit 7b778c5 of branch ``alerts-research``)
now live in the package (``weibull_monitor/alerts/early.py`` and ``rules.py``); replayed on all 109 cached runs, the
package's ``default_rules()`` fire exactly the 509 alerts (rule, level, step) the prototypes fired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from weibull_monitor import default_rules

NAN = math.nan


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


def proposed_rules() -> list[Any]:
    """The rule set the report scores: the package's built-in rules."""
    return default_rules()

"""Training-dynamics signals from per-matrix fits: drift from the Gaussian anchor, scale growth, λ/√(η/λ_wd), and
the per-class aggregates with their dashboard names.

Pure Python on plain data (fits, roles, numbers): no model, no optimizer, no torch needed. docs/monitor.md.

Conventions: a number that is undefined (no weight decay, fit not ok, parameter outside the optimizer) is NaN
in :class:`MatrixStats` and *absent* from the aggregates dict; never inf.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from weibull_monitor.snapshot import keys
from weibull_monitor.snapshot.budget import TimescaleBudget, to_float
from weibull_monitor.snapshot.classes import class_members

__all__ = [
    "STAT_FIELDS",
    "MatrixStats",
    "aggregates",
    "finite_median",
    "is_finite_number",
    "matrix_stats",
    "median_stderr",
    "representative_budget",
    "scale_over_sqrt_lr_wd",
    "scale_rate_update",
    "stats_from_first",
]

NAN = math.nan


def is_finite_number(x: Any) -> bool:
    """A real int or float that is neither NaN nor infinite (None and other types are not)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ratio(num: float, den: float) -> float:
    if not (is_finite_number(num) and is_finite_number(den)) or den == 0:
        return NAN
    return num / den


@dataclass(frozen=True)
class MatrixStats:
    """Dynamics of one matrix at one snapshot (NaN = undefined)."""

    metric_key: str | None  # dashboard key of its k, None when the matrix has no role
    in_aggregates: bool  # counted in the class aggregates (a fused parent is not: its split views are)
    drift: float  # k - K_GAUSSIAN
    drift_z: float  # drift / k_stderr: the drift in standard errors of the fit
    scale_growth: float  # λ / λ at the first snapshot that saw this matrix
    lr: float  # η of the optimizer group holding the matrix, as last used
    lr_peak: float  # the largest η that group has used so far
    weight_decay: float  # λ_wd of that group
    T_over_tau: float  # Σ η_t·λ_wd of that group (NaN without weight decay)
    scale_over_sqrt_lr_wd: float  # λ / √(η/λ_wd) with the current η
    scale_over_sqrt_peak_lr_wd: float  # λ / √(η_peak/λ_wd)
    k_first: float = NAN  # k at the first snapshot that fitted this matrix (its own starting point)
    drift_from_first: float = NAN  # k - k_first
    drift_from_first_z: float = NAN  # that drift over the combined standard error of the two fits
    k_first_stderr: float = NAN  # the standard error of k_first
    scale_rate: float = NAN  # |ln(λ/λ_prev)| per optimizer step since this matrix's previous snapshot
    scale_rate_max_before: float = NAN  # the largest scale_rate of this matrix at its earlier snapshots
    scale_rate_count: int = 0  # how many earlier scale_rate values that maximum is taken over

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: The fields of a MatrixStats, in declaration order (the run store's per-matrix columns come from here).
STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MatrixStats))


def scale_over_sqrt_lr_wd(scale: float, lr: float, weight_decay: float) -> float:
    """λ / √(η/λ_wd); NaN when η or λ_wd is not positive (the expectation needs decoupled decay)."""
    if not (is_finite_number(lr) and is_finite_number(weight_decay)) or lr <= 0 or weight_decay <= 0:
        return NAN
    return _ratio(scale, math.sqrt(lr / weight_decay))


def matrix_stats(
    fits: Mapping[str, Any],
    roles: Mapping[str, Any],
    *,
    k_anchor: float,
    scale_first: Mapping[str, float],
    k_first: Mapping[str, tuple[float, float]] | None = None,
    scale_rates: Mapping[str, tuple[float, float, int]] | None = None,
    group_of: Mapping[str, int | None],
    current_rates: Sequence[tuple[float, float]],
    budget: TimescaleBudget,
    aggregate_excluded: Iterable[str] = (),
) -> dict[str, MatrixStats]:
    """Per-matrix dynamics. ``scale_first`` and ``k_first`` hold each matrix's λ and (k, k_stderr) at its first ok
    fit; ``scale_rates`` each matrix's (scale_rate, scale_rate_max_before, scale_rate_count) at this snapshot
    (:func:`scale_rate_update`); ``group_of`` maps a matrix key to its optimizer group index (None: not
    optimised); ``current_rates`` are the groups' (η, λ_wd) now; ``aggregate_excluded`` are keys (fused parents with split views) that stay out of the
    class aggregates."""
    excluded = set(aggregate_excluded)
    k_first = k_first or {}
    scale_rates = scale_rates or {}
    metric_keys = keys.matrix_metric_keys(roles)
    out: dict[str, MatrixStats] = {}
    for key, fit in fits.items():
        ok = bool(fit.ok)
        k = fit.k if ok else NAN
        scale = fit.scale if ok else NAN
        drift = k - k_anchor if ok else NAN
        group = group_of.get(key)
        if group is not None and 0 <= group < len(current_rates):
            lr, wd = (to_float(x) for x in current_rates[group])
        else:
            lr, wd = NAN, NAN
        peak = budget.peak_lr(group) if group is not None else NAN
        if not is_finite_number(peak):
            peak = lr
        out[key] = MatrixStats(
            metric_key=metric_keys.get(key),
            in_aggregates=key not in excluded and roles.get(key) is not None,
            drift=drift,
            drift_z=_ratio(drift, fit.k_stderr) if ok else NAN,
            scale_growth=_ratio(scale, scale_first.get(key, NAN)),
            lr=lr,
            lr_peak=peak,
            weight_decay=wd,
            T_over_tau=budget.budget(group) if group is not None else NAN,
            scale_over_sqrt_lr_wd=scale_over_sqrt_lr_wd(scale, lr, wd),
            scale_over_sqrt_peak_lr_wd=scale_over_sqrt_lr_wd(scale, peak, wd),
            **stats_from_first(k, fit.k_stderr if ok else NAN, k_first.get(key)),
            **dict(
                zip(("scale_rate", "scale_rate_max_before", "scale_rate_count"), scale_rates.get(key, ()))
            ),
        )
    return out


def stats_from_first(k: float, stderr: float, first: tuple[float, float] | None) -> dict[str, float]:
    """k at the matrix's first fit, the drift since, and that drift in combined standard errors (``first``: the
    (k, k_stderr) of that first fit; the MatrixStats fields ``k_first`` ... ``drift_from_first_z``)."""
    if first is None:
        return {"k_first": NAN, "drift_from_first": NAN, "drift_from_first_z": NAN}
    k0, se0 = first
    drift = k - k0 if is_finite_number(k) else NAN
    return {
        "k_first": k0,
        "k_first_stderr": se0,
        "drift_from_first": drift,
        "drift_from_first_z": _ratio(drift, math.hypot(stderr, se0)) if is_finite_number(stderr) else NAN,
    }


def scale_rate_update(
    previous: tuple[int, float] | None, history: tuple[float, int] | None, step: int, scale: float
) -> tuple[tuple[float, float, int], tuple[int, float] | None, tuple[float, int]]:
    """One matrix's scale rate at ``step``: ((scale_rate, max before, count before), the new previous (step, λ),
    the new history (max, count)). ``previous``: (step, λ) at its last snapshot; ``history``: (largest rate, number
    of rates) at its earlier snapshots. A fit without a scale, or a step at or before the previous one (a repeated
    snapshot), changes nothing."""
    max_before, count = history if history is not None else (NAN, 0)
    unchanged = (max_before, count)
    if not (is_finite_number(scale) and scale > 0) or (previous is not None and step <= previous[0]):
        return (NAN, max_before, count), previous, unchanged
    if previous is None:
        return (NAN, max_before, count), (step, scale), unchanged
    rate = abs(math.log(scale / previous[1])) / (step - previous[0])
    new_max = max(max_before, rate) if is_finite_number(max_before) else rate
    return (rate, max_before, count), (step, scale), (new_max, count + 1)


def median_stderr(stderrs: Iterable[float]) -> float:
    """Standard error of the median of m estimates whose typical standard error is s: ≈ 1.2533·s/√m."""
    values = [s for s in stderrs if is_finite_number(s)]
    if not values:
        return NAN
    return 1.2533 * statistics.median(values) / math.sqrt(len(values))


def finite_median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there is none."""
    finite = [v for v in values if is_finite_number(v)]
    return statistics.median(finite) if finite else NAN


def aggregates(
    fits: Mapping[str, Any],
    roles: Mapping[str, Any],
    stats: Mapping[str, MatrixStats],
    *,
    k_anchor: float,
    T_over_tau: float | None = None,
) -> dict[str, float]:
    """The dashboard metrics of one snapshot (names: docs/monitor.md); undefined ones are absent.

    Per class (medians over the class's matrices, each weight element counted once): ``k_median``, ``k_drift``
    (k_median − K_GAUSSIAN), ``k_drift_z`` (k_drift over the standard error of the median), ``scale_median``,
    ``scale_growth``, ``scale_over_sqrt_lr_wd``, ``scale_over_sqrt_peak_lr_wd``. Global:
    ``selection_transmission_gap`` (Selection k_median − Transmission k_median), ``T_over_tau``.
    Per matrix: ``weibull/k/L<layer>/<component>...`` for every ok fit.
    """
    out: dict[str, float] = {}
    for klass, members in sorted(class_members(fits, roles, stats).items()):
        ks = [fits[key].k for key in members]
        k_med = finite_median(ks)
        values = {
            "k_median": k_med,
            "k_drift": k_med - k_anchor,
            "k_drift_z": _ratio(k_med - k_anchor, median_stderr(fits[key].k_stderr for key in members)),
            "scale_median": finite_median(fits[key].scale for key in members),
            "scale_growth": finite_median(stats[key].scale_growth for key in members),
            "scale_over_sqrt_lr_wd": finite_median(stats[key].scale_over_sqrt_lr_wd for key in members),
            "scale_over_sqrt_peak_lr_wd": finite_median(
                stats[key].scale_over_sqrt_peak_lr_wd for key in members
            ),
        }
        out.update({keys.class_metric(klass, name): v for name, v in values.items() if is_finite_number(v)})
    sel = out.get(keys.class_metric("selection", "k_median"))
    trans = out.get(keys.class_metric("transmission", "k_median"))
    if sel is not None and trans is not None:
        out[keys.SELECTION_TRANSMISSION_GAP] = sel - trans
    if T_over_tau is not None and is_finite_number(T_over_tau):
        out[keys.T_OVER_TAU] = float(T_over_tau)
    for key, s in sorted(stats.items()):
        fit = fits[key]
        if s.metric_key and fit.ok and is_finite_number(fit.k):
            out[s.metric_key] = float(fit.k)
    return out


def representative_budget(
    sizes: Mapping[str, int], group_of: Mapping[str, int | None], budget: TimescaleBudget
) -> float | None:
    """The run's single T/τ figure: the budget of the decayed group holding the most monitored elements.
    None when no monitored matrix sits in a group with weight decay (T/τ undefined)."""
    elements: dict[int, int] = {}
    for key, n in sizes.items():
        group = group_of.get(key)
        if group is not None and is_finite_number(budget.budget(group)):
            elements[group] = elements.get(group, 0) + int(n)
    if not elements:
        return None
    group = max(sorted(elements), key=elements.__getitem__)
    return budget.budget(group)

"""Training-dynamics signals from per-matrix fits: drift from the Gaussian anchor, scale growth, λ/√(η/λ_wd),
the timescale budget T/τ, and the per-class aggregates with their dashboard names.

Pure Python on plain data (fits, roles, numbers): no model, no optimizer, no torch needed (a tensor learning
rate is accepted and kept as a tensor so reading it never forces a device sync). ``shared/science.md`` §2-§5.

Conventions: a number that is undefined (no weight decay, fit not ok, parameter outside the optimizer) is NaN
in :class:`MatrixStats` and *absent* from the aggregates dict; never inf.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NAN = math.nan
METRIC_PREFIX = "weibull"
#: Classes aggregated on dashboards, in display order (a class without members is simply absent).
CLASSES = ("selection", "transmission", "value", "mixed", "other")


def is_finite_number(x: Any) -> bool:
    """A real int or float that is neither NaN nor infinite (None and other types are not)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ratio(num: float, den: float) -> float:
    if not (is_finite_number(num) and is_finite_number(den)) or den == 0:
        return NAN
    return num / den


# ------------------------------------------------------------------------------------------------ T / tau


def _to_float(x: Any) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def _max(a: Any, b: Any) -> Any:
    if hasattr(a, "item") or hasattr(b, "item"):  # tensor learning rates: stay on device, no sync per step
        import torch

        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


class TimescaleBudget:
    """T/τ = Σ_t η_t·λ_wd per optimizer parameter group: the training budget in units of the AdamW timescale
    τ = 1/(η·λ_wd) (decoupled decay; science.md §4), plus the peak η seen per group.

    ``record`` is called once per optimizer update with the (η, λ_wd) of every group as used by that update.
    A group that never had λ_wd > 0 has an undefined budget (NaN), never 0 or inf.
    """

    def __init__(self) -> None:
        self._sums: list[Any] = []
        self._peaks: list[Any] = []
        self._decayed: list[bool] = []
        self.updates = 0

    def _grow(self, n: int) -> None:
        while len(self._sums) < n:
            self._sums.append(0.0)
            self._peaks.append(0.0)
            self._decayed.append(False)

    def record(self, rates: Sequence[tuple[Any, Any]], updates: int = 1) -> None:
        """Add ``updates`` optimizer updates made at the given per-group (η, λ_wd)."""
        if updates <= 0:
            return
        self._grow(len(rates))
        for group, (lr, wd) in enumerate(rates):
            self._sums[group] = self._sums[group] + updates * (lr * wd)
            self._peaks[group] = _max(self._peaks[group], lr)
            if not self._decayed[group]:
                self._decayed[group] = _to_float(wd) > 0
        self.updates += updates

    def budget(self, group: int) -> float:
        """Σ η_t·λ_wd of a group; NaN if the group is unknown or never had weight decay."""
        if group is None or not 0 <= group < len(self._sums) or not self._decayed[group]:
            return NAN
        return _to_float(self._sums[group])

    def peak_lr(self, group: int) -> float:
        if group is None or not 0 <= group < len(self._peaks) or self.updates == 0:
            return NAN
        return _to_float(self._peaks[group])

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": [_to_float(s) for s in self._sums],
            "peaks": [_to_float(p) for p in self._peaks],
            "decayed": list(self._decayed),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sums = [float(s) for s in state["sums"]]
        self._peaks = [float(p) for p in state["peaks"]]
        self._decayed = [bool(d) for d in state["decayed"]]
        self.updates = int(state["updates"])


# --------------------------------------------------------------------------------------------- metric keys

_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_")


def matrix_metric_keys(roles: Mapping[str, Any]) -> dict[str, str]:
    """Stable dashboard key per matrix: ``weibull/k/L<layer>/<component>[/E<expert>][/<stack>]``.

    Matrices without a layer (embeddings, lm_head) drop the ``L<layer>/`` part. Split views carry their own
    component (``L3/q`` beside the fused ``L3/qkv``). Where two matrices still share a key (e.g. several
    ``other`` matrices in one layer) every one of them gets its sanitised parameter name appended, so the
    result does not depend on the order of the parameters.
    """
    base: dict[str, str] = {}
    for key, role in roles.items():
        if role is None:
            continue
        parts = [f"{METRIC_PREFIX}/k"]
        if role.layer is not None:
            parts.append(f"L{role.layer}")
        parts.append(role.component)
        if role.expert is not None:
            parts.append(f"E{role.expert}")
        if role.stack:
            parts.append(_sanitize(role.stack))
        base[key] = "/".join(parts)
    counts: dict[str, int] = {}
    for metric in base.values():
        counts[metric] = counts.get(metric, 0) + 1
    return {key: (m if counts[m] == 1 else f"{m}/{_sanitize(key)}") for key, m in base.items()}


# ------------------------------------------------------------------------------------------- per matrix


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    group_of: Mapping[str, int | None],
    current_rates: Sequence[tuple[float, float]],
    budget: TimescaleBudget,
    aggregate_excluded: Iterable[str] = (),
) -> dict[str, MatrixStats]:
    """Per-matrix dynamics. ``group_of`` maps a matrix key to its optimizer group index (None: not optimised);
    ``current_rates`` are the groups' (η, λ_wd) now; ``aggregate_excluded`` are keys (fused parents with split
    views) that stay out of the class aggregates."""
    excluded = set(aggregate_excluded)
    metric_keys = matrix_metric_keys(roles)
    out: dict[str, MatrixStats] = {}
    for key, fit in fits.items():
        ok = bool(fit.ok)
        k = fit.k if ok else NAN
        scale = fit.scale if ok else NAN
        drift = k - k_anchor if ok else NAN
        group = group_of.get(key)
        if group is not None and 0 <= group < len(current_rates):
            lr, wd = (_to_float(x) for x in current_rates[group])
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
        )
    return out


# ------------------------------------------------------------------------------------------- aggregates


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


def class_members(
    fits: Mapping[str, Any], roles: Mapping[str, Any], stats: Mapping[str, MatrixStats]
) -> dict:
    """klass -> keys of the ok fits that count in that class's aggregates."""
    members: dict[str, list[str]] = {}
    for key, fit in fits.items():
        role, s = roles.get(key), stats.get(key)
        if role is None or s is None or not s.in_aggregates or not fit.ok:
            continue
        members.setdefault(role.klass, []).append(key)
    return members


def aggregates(
    fits: Mapping[str, Any],
    roles: Mapping[str, Any],
    stats: Mapping[str, MatrixStats],
    *,
    k_anchor: float,
    T_over_tau: float | None = None,
) -> dict[str, float]:
    """The dashboard metrics of one snapshot (names of docs/contracts.md); undefined ones are absent.

    Per class (medians over the class's matrices, each weight element counted once): ``k_median``, ``k_drift``
    (k_median − K_GAUSSIAN), ``k_drift_z`` (k_drift over the standard error of the median), ``scale_median``,
    ``scale_growth``, ``scale_over_sqrt_lr_wd``, ``scale_over_sqrt_peak_lr_wd``. Global:
    ``selection_transmission_gap`` (Selection k_median − Transmission k_median), ``T_over_tau``.
    Per matrix: ``weibull/k/L<layer>/<component>...`` for every ok fit.
    """
    out: dict[str, float] = {}
    for klass, keys in sorted(class_members(fits, roles, stats).items()):
        ks = [fits[key].k for key in keys]
        k_med = finite_median(ks)
        base = f"{METRIC_PREFIX}/{klass}"
        values = {
            "k_median": k_med,
            "k_drift": k_med - k_anchor,
            "k_drift_z": _ratio(k_med - k_anchor, median_stderr(fits[key].k_stderr for key in keys)),
            "scale_median": finite_median(fits[key].scale for key in keys),
            "scale_growth": finite_median(stats[key].scale_growth for key in keys),
            "scale_over_sqrt_lr_wd": finite_median(stats[key].scale_over_sqrt_lr_wd for key in keys),
            "scale_over_sqrt_peak_lr_wd": finite_median(
                stats[key].scale_over_sqrt_peak_lr_wd for key in keys
            ),
        }
        out.update({f"{base}/{name}": v for name, v in values.items() if is_finite_number(v)})
    sel, trans = (
        out.get(f"{METRIC_PREFIX}/selection/k_median"),
        out.get(f"{METRIC_PREFIX}/transmission/k_median"),
    )
    if sel is not None and trans is not None:
        out[f"{METRIC_PREFIX}/selection_transmission_gap"] = sel - trans
    if T_over_tau is not None and is_finite_number(T_over_tau):
        out[f"{METRIC_PREFIX}/T_over_tau"] = float(T_over_tau)
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

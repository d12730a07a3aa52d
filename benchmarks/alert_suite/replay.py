"""Rebuild snapshot objects from a RunStore and feed any rule set through an AlertEngine.

The rebuilt snapshots carry what the built-in rules read (``fits``, ``roles``, ``matrices``, ``aggregates``,
``step``, ``attention_kind``, ``expectation``, ``T_over_tau``) in the package's own records (``WeibullFit``,
``Role``, ``MatrixStats``), with the per-matrix statistics from the first snapshot and the scale rates recomputed
the way the SnapshotBuilder does (stores written before those fields lack them). Two extra fields: ``extras``
(per-snapshot weights-only signals from the run's signals.json, e.g. the per-head logit bounds, which the store does
not keep) and ``first`` (each matrix's fit at its first snapshot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weibull_monitor.estimator import WeibullFit as Fit
from weibull_monitor.models import Role
from weibull_monitor.snapshot.dynamics import MatrixStats as Stats
from weibull_monitor.snapshot.dynamics import stats_from_first

NAN = math.nan


def _f(x: Any) -> float:
    return NAN if x is None else float(x)


@dataclass
class ReplaySnapshot:
    step: int
    fits: dict[str, Fit]
    roles: dict[str, Role]
    aggregates: dict[str, float]
    matrices: dict[str, Stats]
    attention_kind: str | None
    expectation: str | None
    T_over_tau: float | None
    first: dict[str, Fit] = field(default_factory=dict)  # each matrix's fit at its first snapshot
    extras: dict[str, Any] = field(default_factory=dict)
    alerts: list[Any] = field(default_factory=list)
    # the package's Snapshot fields, from the run's signals (the weights-only per-head figures)
    logit_bounds: dict[int, list[float]] = field(default_factory=dict)
    logit_bounds_first: dict[int, list[float]] = field(default_factory=dict)
    attention_qk_norm: bool | None = None


_STAT_FIELDS = (
    "drift", "drift_z", "scale_growth", "lr", "lr_peak", "weight_decay", "T_over_tau",
    "scale_over_sqrt_lr_wd", "scale_over_sqrt_peak_lr_wd",
)  # fmt: skip


def store_runs(store_path: Path) -> list[tuple[int, str]]:
    """(run_id, name) of every run in a store."""
    from weibull_monitor import RunStore

    store = RunStore(store_path, read_only=True)
    try:
        return [(int(r["run_id"]), str(r["name"])) for r in store.runs()]
    finally:
        store.close()


def load_snapshots(
    store_path: Path, extras: Callable[[int], dict[str, Any]] | None = None, run_id: int | None = None
) -> list[ReplaySnapshot]:
    """Every snapshot of one run in ``store_path`` (the only one unless ``run_id`` says which), in step order."""
    from weibull_monitor import RunStore

    store = RunStore(store_path, read_only=True)
    try:
        if run_id is None:
            runs = store.runs()
            if len(runs) != 1:
                raise ValueError(f"{store_path}: expected one run, found {len(runs)}; pass run_id")
            run_id = runs[0]["run_id"]
        snap_rows = store.snapshots(run_id)
        fit_rows = store.fits(run_id=run_id)
        agg_rows = store.aggregates(run_id=run_id)
    finally:
        store.close()
    fits_by_step: dict[int, list[dict[str, Any]]] = {}
    for row in fit_rows:
        fits_by_step.setdefault(row["step"], []).append(row)
    aggs_by_step: dict[int, dict[str, float]] = {}
    for row in agg_rows:
        if row["value"] is not None:
            aggs_by_step.setdefault(row["step"], {})[row["metric"]] = float(row["value"])
    from weibull_monitor.snapshot.dynamics import scale_rate_update

    first: dict[str, Fit] = {}
    scale_prev: dict[str, Any] = {}
    scale_history: dict[str, Any] = {}
    out = []
    for srow in snap_rows:
        step = int(srow["step"])
        fits, roles, stats = {}, {}, {}
        for row in fits_by_step.get(step, []):
            key = row["name"]
            fit = Fit(
                k=_f(row["k"]), scale=_f(row["scale"]), r2=_f(row["r2"]), n=int(row["n"] or 0),
                n_zero=int(row["n_zero"] or 0), n_nonfinite=int(row["n_nonfinite"] or 0),
                k_stderr=_f(row["k_stderr"]), scale_rel_stderr=_f(row["scale_rel_stderr"]),
                method=row["method"] or "", ok=bool(row["ok"]), reason=row["reason"],
                q10=_f(row["q10"]), q50=_f(row["q50"]), q90=_f(row["q90"]), q99=_f(row["q99"]),
                q999=_f(row["q999"]),
            )  # fmt: skip
            fits[key] = fit
            if fit.ok and key not in first:
                first[key] = fit
            if row["klass"] is not None:
                roles[key] = Role(
                    row["layer"],
                    row["component"],
                    row["klass"],
                    row["expert"],
                    row["stack"],
                    row["fused_parent"],
                )
            stats[key] = Stats(
                metric_key=row["metric_key"],
                in_aggregates=bool(row["in_aggregates"]),
                **{name: _f(row[name]) for name in _STAT_FIELDS},
                **(
                    stats_from_first(fit.k, fit.k_stderr, (first[key].k, first[key].k_stderr))
                    if fit.ok and key in first
                    else {}
                ),
                **_rate(fit, key, step, scale_prev, scale_history, scale_rate_update),
            )
        extra = extras(step) if extras is not None else {}
        bounds, bounds_first = extra.get("qk_head_norms") or [], extra.get("qk_head_norms_first") or []
        out.append(
            ReplaySnapshot(
                logit_bounds=dict(enumerate(bounds)),
                logit_bounds_first=dict(enumerate(bounds_first)),
                attention_qk_norm=extra.get("qk_norm"),
                step=step,
                fits=fits,
                roles=roles,
                aggregates=aggs_by_step.get(step, {}),
                matrices=stats,
                attention_kind=srow["attention_kind"],
                expectation=srow["expectation"],
                T_over_tau=srow["T_over_tau"],
                first=dict(first),
                extras=extra,
            )
        )
    return out


def _rate(fit: Fit, key: str, step: int, prev: dict, history: dict, update: Callable) -> dict[str, Any]:
    if not fit.ok:
        return {}
    (rate, before, count), new_prev, new_history = update(prev.get(key), history.get(key), step, fit.scale)
    if new_prev is not None:
        prev[key] = new_prev
    history[key] = new_history
    return {"scale_rate": rate, "scale_rate_max_before": before, "scale_rate_count": count}


@dataclass(frozen=True)
class FiredAlert:
    step: int
    rule: str
    level: str
    key: str
    message: str


def replay(snapshots: Iterable[ReplaySnapshot], rules: Sequence[Any]) -> list[FiredAlert]:
    """Feed the snapshots, in order, through a fresh AlertEngine holding ``rules`` (fresh instances, please)."""
    from weibull_monitor import AlertEngine

    engine = AlertEngine(list(rules))
    fired = []
    for snapshot in snapshots:
        for alert in engine(snapshot):
            fired.append(FiredAlert(alert.step, alert.rule, alert.level, alert.key, alert.message))
    return fired

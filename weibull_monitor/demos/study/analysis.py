"""Reading a study's store back: one result per run, the √(η/λ_wd) line per seed and pooled, their spread."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weibull_monitor.demos.study.config import (
    K_MEDIAN,
    TRANSMISSION_GROWTH,
    TRANSMISSION_SCALE,
    StudyError,
    _LrWd,
)
from weibull_monitor.demos.study.lines import linear_fit, pearson, spearman
from weibull_monitor.snapshot.dynamics import finite_median
from weibull_monitor.store import RunStore


@dataclass
class RunResult(_LrWd):
    """One run of the study, read back from the store."""

    name: str
    lr: float  # peak η of the decayed group (from the store's fit rows)
    weight_decay: float
    steps: list[int]
    t_over_tau: list[float]  # per snapshot
    scale: list[float]  # Transmission median λ per snapshot
    growth: list[float]  # Transmission median of λ/λ_first per snapshot
    scale_over_sqrt: list[float]  # Transmission median λ over √(η/λ_wd) (η: the run's peak) per snapshot
    k: dict[str, list[float]]  # class (or "qkv (fused)") -> median k per snapshot (NaN where absent)
    attention_kind: str | None
    seed: int | None = None  # from the run name (``...,seed=N``); None for runs named otherwise

    @property
    def terminal_scale(self) -> float:
        return self.scale[-1]

    @property
    def terminal_growth(self) -> float:
        """λ/λ_first at the last snapshot."""
        return self.growth[-1]

    @property
    def growth_spearman(self) -> float:
        """Rank correlation of λ/λ_first with T/τ over the whole run (1 = rises at every snapshot)."""
        return spearman(self.t_over_tau, self.growth)


@dataclass(frozen=True)
class ScaleLine:
    """Terminal Transmission λ against √(η/λ_wd) over a set of runs (one seed's, or all of them)."""

    seed: int | None  # None: every run of the store pooled (or runs named without a seed)
    n_runs: int
    pearson_r: float  # NaN with fewer than two runs or no spread
    slope: float  # d λ_terminal / d √(η/λ_wd), ordinary least squares with intercept
    intercept: float
    through_origin: float  # λ_terminal ≈ c·√(η/λ_wd), least squares through 0 (the paper's form)

    @classmethod
    def of(cls, runs: Sequence[RunResult], seed: int | None = None) -> ScaleLine:
        x = [r.sqrt_lr_over_wd for r in runs]
        y = [r.terminal_scale for r in runs]
        slope, intercept = linear_fit(x, y) if len(runs) >= 2 else (math.nan, math.nan)
        origin = sum(a * b for a, b in zip(x, y)) / sum(a * a for a in x) if runs else math.nan
        return cls(seed, len(runs), pearson(x, y), slope, intercept, origin)


@dataclass(frozen=True)
class Spread:
    """Mean, min and max of one figure over the seeds (NaN figures left out; ``n`` counts the rest)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.fmean(finite), min(finite), max(finite), len(finite))

    def __str__(self) -> str:
        return f"mean {self.mean:.4f} (min {self.low:.4f}, max {self.high:.4f}, {self.n} seeds)"


@dataclass
class StudyResult:
    """The study's findings; every number here was computed from the store.

    ``pearson_r``, ``slope``, ``intercept`` and ``through_origin`` are the line through every run, all seeds
    pooled (one point per run); ``per_seed`` holds the same line for each seed's runs alone, and
    :attr:`r_spread` / :attr:`slope_spread` their spread over the seeds: the figures that say how much one
    study's answer owes to its seed (and so to float rounding, which moves a run about as much as a new seed)."""

    runs: list[RunResult]
    pearson_r: float  # terminal Transmission λ against √(η/λ_wd), all runs pooled
    slope: float  # d λ_terminal / d √(η/λ_wd), ordinary least squares with intercept
    intercept: float
    through_origin: float  # λ_terminal ≈ c·√(η/λ_wd), least squares through 0 (the paper's form)
    per_seed: list[ScaleLine] = field(default_factory=list)  # one line per seed (runs named with a seed)
    store: Path | None = None
    figures: list[Path] = field(default_factory=list)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # per run: steps, seconds, final loss
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why the analysis could not use it

    @property
    def sqrt_span(self) -> float:
        """max / min of √(η/λ_wd) over the runs."""
        xs = [r.sqrt_lr_over_wd for r in self.runs]
        return max(xs) / min(xs)

    @property
    def seeds(self) -> list[int | None]:
        return sorted({r.seed for r in self.runs}, key=lambda s: (s is None, s or 0))

    @property
    def r_spread(self) -> Spread:
        """Pearson r over the seeds (each seed's own line)."""
        return Spread.of([line.pearson_r for line in self.per_seed])

    @property
    def slope_spread(self) -> Spread:
        """The least-squares slope over the seeds (each seed's own line)."""
        return Spread.of([line.slope for line in self.per_seed])


_SEED_SUFFIX = re.compile(r",seed=(\d+)$")


def run_seed(name: str) -> int | None:
    """The seed in a study run's name (``lr=0.005,wd=1,seed=2`` -> 2), None for a name without one."""
    match = _SEED_SUFFIX.search(name)
    return int(match.group(1)) if match else None


def _decayed_rates(fits: list[dict]) -> tuple[float, float] | None:
    """(peak η, λ_wd) of the Transmission matrices' optimizer group at the run's last step."""
    rows = [
        f
        for f in fits
        if f.get("klass") == "transmission" and (f.get("weight_decay") or 0) > 0 and f.get("lr_peak")
    ]
    if not rows:
        return None
    last = max(int(f["step"]) for f in rows)
    rows = [f for f in rows if int(f["step"]) == last]
    return statistics.median(f["lr_peak"] for f in rows), statistics.median(f["weight_decay"] for f in rows)


def load_run_result(store: Any, run: dict[str, Any]) -> tuple[RunResult | None, str | None]:
    """One run's series from an open :class:`RunStore`, or (None, why) when the study cannot use it: no decayed
    Transmission matrices, fewer than two snapshots with T/τ, or no Transmission scale at the last snapshot (a
    diverged run: its weights stopped fitting). Such runs are reported, never silently left out."""
    run_id = int(run["run_id"])
    fits = store.fits(run_id=run_id)
    rates = _decayed_rates(fits)
    if rates is None:
        return None, "no Transmission matrix in an optimizer group with weight decay (λ_wd > 0)"
    metrics: dict[int, dict[str, float]] = {}
    for row in store.aggregates(run_id=run_id):
        if row["value"] is not None:
            metrics.setdefault(int(row["step"]), {})[row["metric"]] = float(row["value"])
    fused: dict[int, list[float]] = {}
    for f in fits:
        if f.get("component") == "qkv" and f.get("ok") and f.get("k") is not None:
            fused.setdefault(int(f["step"]), []).append(float(f["k"]))
    # the initial snapshot (step 0) has no update behind it yet: its T/τ is 0, not missing
    snaps = [
        {**s, "T_over_tau": 0.0} if int(s["step"]) == 0 and s.get("T_over_tau") is None else s
        for s in store.snapshots(run_id)
    ]
    if snaps and TRANSMISSION_SCALE not in metrics.get(int(snaps[-1]["step"]), {}):
        return None, f"no Transmission scale at the last snapshot (step {snaps[-1]['step']}): diverged?"
    snaps = [
        s
        for s in snaps
        if s.get("T_over_tau") is not None and TRANSMISSION_SCALE in metrics.get(int(s["step"]), {})
    ]
    if len(snaps) < 2:
        return None, f"{len(snaps)} snapshot(s) with T/τ and a Transmission scale; at least 2 needed"
    steps = [int(s["step"]) for s in snaps]
    classes = ("selection", "value", "transmission")
    k = {c: [metrics[s].get(K_MEDIAN.format(klass=c), math.nan) for s in steps] for c in classes}
    if fused:
        k["qkv (fused)"] = [finite_median(fused.get(s, [])) for s in steps]
    kinds = [s.get("attention_kind") for s in snaps if s.get("attention_kind")]
    result = RunResult(
        name=str(run["name"]),
        lr=rates[0],
        weight_decay=rates[1],
        steps=steps,
        t_over_tau=[float(s["T_over_tau"]) for s in snaps],
        scale=[metrics[s][TRANSMISSION_SCALE] for s in steps],
        growth=[metrics[s].get(TRANSMISSION_GROWTH, math.nan) for s in steps],
        # over the run's peak η (the stored per-snapshot ratio uses the peak so far, small during warmup)
        scale_over_sqrt=[metrics[s][TRANSMISSION_SCALE] / math.sqrt(rates[0] / rates[1]) for s in steps],
        k=k,
        attention_kind=kinds[-1] if kinds else run.get("attention_kind"),
        seed=run_seed(str(run["name"])),
    )
    return result, None


def analyse_store(store_path: str | Path) -> StudyResult:
    """Read every usable run of a store and compute the scaling figures. StudyError when fewer than two runs
    with decayed Transmission matrices are there (no line to fit)."""

    path = Path(store_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such run store")
    runs: list[RunResult] = []
    skipped: dict[str, str] = {}
    with RunStore(path) as store:
        for run in store.runs():
            result, reason = load_run_result(store, run)
            if result is None:
                skipped[str(run["name"])] = reason or "unusable"
            else:
                runs.append(result)
    if len(runs) < 2:
        why = "".join(f"; {name}: {reason}" for name, reason in skipped.items())
        raise StudyError(
            f"{path}: {len(runs)} usable run(s) with decayed Transmission matrices and T/τ; "
            f"the study needs at least two{why}"
        )
    runs.sort(key=lambda r: (r.seed is None, r.seed or 0, r.sqrt_lr_over_wd, r.tau))
    pooled = ScaleLine.of(runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    return StudyResult(
        runs=runs,
        pearson_r=pooled.pearson_r,
        slope=pooled.slope,
        intercept=pooled.intercept,
        through_origin=pooled.through_origin,
        per_seed=[ScaleLine.of([r for r in runs if r.seed == seed], seed) for seed in seeds],
        store=path,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------------ output

"""Scores: recall, false alarms, lead time, threshold sweeps, early AUROC and paired bootstrap (docs/alerts.md §3)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .baselines import Baseline, Series
from .labels import Label

EARLY_WINDOW = 50
NEGATIVE_WINDOWS = ((0, 50), (250, 300))
ALERT_LEVELS = ("warning", "critical")


def snap_ceil(step: int, every: int) -> int:
    return -(-step // every) * every


@dataclass(frozen=True)
class Outcome:
    first_any: int | None  # first alert of the run (any step)
    detected: int | None  # first alert at or after the cause step


def outcome_from_steps(label: Label, steps: Iterable[int]) -> Outcome:
    ordered = sorted(steps)
    first_any = ordered[0] if ordered else None
    detected = next((s for s in ordered if s >= label.cause), None)
    return Outcome(first_any, detected)


def outcome_from_series(label: Label, series: Series, threshold: float) -> Outcome:
    return Outcome(series.first_crossing(threshold, 0), series.first_crossing(threshold, label.cause))


def lead_steps(label: Label, detected: int | None) -> float:
    """Detection − onset; a miss counts as detected one interval after the run's last step (for paired stats)."""
    assert label.onset is not None
    step = detected if detected is not None else label.steps + label.every
    return float(step - label.onset)


def lead_intervals(label: Label, detected: int | None) -> float:
    assert label.onset is not None
    step = detected if detected is not None else label.steps + label.every
    return (step - snap_ceil(label.onset, label.every)) / label.every


@dataclass(frozen=True)
class Summary:
    n_failing: int
    detected: int
    in_time: int  # lead <= 0 intervals
    n_negative: int
    flagged: int
    negative_steps: int
    pre_event: int  # injected runs alerted before their event
    leads_steps: tuple[float, ...]  # detected runs only
    leads_intervals: tuple[float, ...]

    @property
    def recall(self) -> float:
        return self.detected / self.n_failing if self.n_failing else math.nan

    @property
    def recall_in_time(self) -> float:
        return self.in_time / self.n_failing if self.n_failing else math.nan

    @property
    def fa_rate(self) -> float:
        return self.flagged / self.n_negative if self.n_negative else math.nan

    @property
    def fa_per_10k(self) -> float:
        return 1e4 * self.flagged / self.negative_steps if self.negative_steps else math.nan

    @property
    def median_lead_steps(self) -> float:
        return statistics.median(self.leads_steps) if self.leads_steps else math.nan

    @property
    def median_lead_intervals(self) -> float:
        return statistics.median(self.leads_intervals) if self.leads_intervals else math.nan


def summarize(labels: Sequence[Label], outcomes: Mapping[str, Outcome]) -> Summary:
    failing = [lab for lab in labels if lab.failing]
    negatives = [lab for lab in labels if lab.negative]
    detected = [lab for lab in failing if outcomes[lab.name].detected is not None]
    leads_i = [lead_intervals(lab, outcomes[lab.name].detected) for lab in detected]
    return Summary(
        n_failing=len(failing),
        detected=len(detected),
        in_time=sum(1 for x in leads_i if x <= 0),
        n_negative=len(negatives),
        flagged=sum(1 for lab in negatives if outcomes[lab.name].first_any is not None),
        negative_steps=sum(lab.steps for lab in negatives),
        pre_event=sum(
            1
            for lab in labels
            if lab.cause > 0
            and outcomes[lab.name].first_any is not None
            and outcomes[lab.name].first_any < lab.cause
        ),
        leads_steps=tuple(lead_steps(lab, outcomes[lab.name].detected) for lab in detected),
        leads_intervals=tuple(leads_i),
    )


# ------------------------------------------------------------------------------------------ sweeps


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    summary: Summary


def sweep(baseline: Baseline, labels: Sequence[Label], series: Mapping[str, Series]) -> list[SweepPoint]:
    points = []
    for threshold in baseline.grid:
        outcomes = {lab.name: outcome_from_series(lab, series[lab.name], threshold) for lab in labels}
        points.append(SweepPoint(threshold, summarize(labels, outcomes)))
    return points


def recall_at_flagged(points: Sequence[SweepPoint], max_flagged: int) -> tuple[float, float]:
    """The best in-time recall (and its threshold) among thresholds flagging at most ``max_flagged`` negatives."""
    ok = [p for p in points if p.summary.flagged <= max_flagged]
    if not ok:
        return math.nan, math.nan
    best = max(ok, key=lambda p: (p.summary.in_time, p.summary.detected, -p.threshold))
    return best.summary.recall_in_time, best.threshold


def calibrated_threshold(points: Sequence[SweepPoint], max_flagged: int = 0) -> float:
    """The lowest threshold of the grid that flags at most ``max_flagged`` negatives (on the calibration half)."""
    ok = [p.threshold for p in points if p.summary.flagged <= max_flagged]
    return min(ok) if ok else math.inf


# ------------------------------------------------------------------------------------------ AUROC


def early_scores(labels: Sequence[Label], series: Mapping[str, Series]) -> tuple[list[float], list[float]]:
    pos, neg = [], []
    for lab in labels:
        s = series[lab.name]
        if lab.failing:
            pos.append(s.max_between(lab.cause, lab.cause + EARLY_WINDOW))
        elif lab.negative:
            for lo, hi in NEGATIVE_WINDOWS:
                if lab.steps >= hi:
                    neg.append(s.max_between(lo, hi))
    return pos, neg


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for p in pos:
        for n in neg:
            if p > n:
                wins += 1
            elif p == n:
                wins += 0.5
    return wins / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------------ bootstrap


def paired_bootstrap(
    diffs: Sequence[float], reps: int = 2000, seed: int = 0, stat: Callable = statistics.median
) -> tuple[float, float, float]:
    """(statistic, 2.5% and 97.5% bootstrap quantiles) of paired differences."""
    if not diffs:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    n = len(diffs)
    boots = sorted(stat([diffs[rng.randrange(n)] for _ in range(n)]) for _ in range(reps))
    return stat(diffs), boots[int(0.025 * reps)], boots[min(reps - 1, int(0.975 * reps))]

"""The printed report: labels, rule sets and baselines scored per split, the targets, and the quick-mode checks."""

from __future__ import annotations

import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import score
from .baselines import BASELINES, Baseline, Series
from .data import RunData, load_suite
from .kscores import KSCORES
from .replay import FiredAlert, replay
from .runs import RunSpec

SPLITS = ("calibration", "heldout")


def default_rule_set() -> list[Any]:
    from weibull_monitor import default_rules

    return default_rules()


def proposed_rule_set() -> list[Any]:
    from .rules import proposed_rules

    return proposed_rules()


#: The package's rules (the prototypes frozen on the calibration half, moved into the package; the rules before
#: issue 14 are scored in docs/alerts.md §4 from the package of that time).
RULE_SETS: dict[str, Callable[[], list[Any]]] = {"package": proposed_rule_set}


@dataclass
class RuleSetResult:
    name: str
    alerts: dict[str, list[FiredAlert]]  # run -> fired alerts (all levels)

    def steps(self, run: str, rule: str | None = None) -> list[int]:
        return [
            a.step
            for a in self.alerts[run]
            if a.level in score.ALERT_LEVELS and (rule is None or a.rule == rule)
        ]

    def rules(self) -> list[str]:
        return sorted({a.rule for fired in self.alerts.values() for a in fired})


def run_rule_set(name: str, factory: Callable[[], list[Any]], data: Mapping[str, RunData]) -> RuleSetResult:
    return RuleSetResult(name, {run: replay(d.snapshots, factory()) for run, d in data.items()})


def _fmt(x: float, spec: str = ".2f") -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


@dataclass
class Row:
    detector: str
    split: str
    summary: score.Summary
    auroc: float = math.nan
    threshold: float = math.nan
    swept: float = (
        math.nan
    )  # best in-time recall over the threshold sweep at <= the proposed rules' false alarms


def _split_labels(data: Mapping[str, RunData], split: str) -> list:
    return [d.label for d in data.values() if d.spec.split == split]


def rule_rows(result: RuleSetResult, data: Mapping[str, RunData], per_rule: bool = True) -> list[Row]:
    rows = []
    names = [None, *result.rules()] if per_rule else [None]
    for rule in names:
        for split in SPLITS:
            labels = _split_labels(data, split)
            outcomes = {
                lab.name: score.outcome_from_steps(lab, result.steps(lab.name, rule)) for lab in labels
            }
            label = f"{result.name}: any warning+" if rule is None else f"  {result.name}/{rule}"
            rows.append(Row(label, split, score.summarize(labels, outcomes)))
    return rows


@dataclass
class BaselineResult:
    baseline: Baseline
    series: dict[str, Series]
    calibrated: float  # lowest grid threshold flagging no calibration negative
    sweeps: dict[str, list[score.SweepPoint]]


def run_baselines(
    data: Mapping[str, RunData], detectors: Sequence[Baseline] = BASELINES
) -> list[BaselineResult]:
    out = []
    for baseline in detectors:
        series = {
            run: baseline.series(d.snapshots if baseline.source == "snapshots" else d.signals)
            for run, d in data.items()
        }
        sweeps = {split: score.sweep(baseline, _split_labels(data, split), series) for split in SPLITS}
        calibrated = score.calibrated_threshold(sweeps["calibration"], 0)
        out.append(BaselineResult(baseline, series, calibrated, sweeps))
    return out


def baseline_rows(
    results: Sequence[BaselineResult],
    data: Mapping[str, RunData],
    max_flagged: Mapping[str, int] | None = None,
) -> list[Row]:
    rows = []
    for r in results:
        for split in SPLITS:
            labels = _split_labels(data, split)
            pos, neg = score.early_scores(labels, r.series)
            auc = score.auroc(pos, neg)
            swept = score.recall_at_flagged(r.sweeps[split], (max_flagged or {}).get(split, 0))[0]
            for which, threshold in (("calibrated", r.calibrated), ("default", r.baseline.default)):
                if threshold is None:
                    continue
                outcomes = {
                    lab.name: score.outcome_from_series(lab, r.series[lab.name], threshold) for lab in labels
                }
                kind = (
                    "weights" if r.baseline.weights_only else ("cheap" if r.baseline.cheap else "activations")
                )
                if r.baseline.source == "snapshots":
                    kind = "monitor"
                rows.append(
                    Row(
                        f"{r.baseline.name} ({which}, {kind})",
                        split,
                        score.summarize(labels, outcomes),
                        auroc=auc,
                        threshold=threshold,
                        swept=swept,
                    )
                )
    return rows


HEADER = (
    f"{'detector':<44} {'split':<11} {'recall':>9} {'in time':>9} {'false alarms':>12} {'FA/10k':>7} "
    f"{'pre-ev':>6} {'lead med':>9} {'lead med':>9} {'AUROC@50':>8} {'thr':>8} {'swept':>6}"
)
SUBHEADER = (
    f"{'':<44} {'':<11} {'':>9} {'(lead<=0)':>9} {'(negatives)':>12} {'steps':>7} {'':>6} "
    f"{'(steps)':>9} {'(interv.)':>9} {'':>8} {'':>8} {'recall':>6}"
)


def format_row(row: Row) -> str:
    s = row.summary
    recall = f"{s.detected}/{s.n_failing} {_fmt(100 * s.recall, '.0f')}%"
    in_time = f"{s.in_time}/{s.n_failing}"
    fa = f"{s.flagged}/{s.n_negative} {_fmt(100 * s.fa_rate, '.0f')}%"
    return (
        f"{row.detector:<44} {row.split:<11} {recall:>9} {in_time:>9} {fa:>12} {_fmt(s.fa_per_10k, '.1f'):>7} "
        f"{s.pre_event:>6} {_fmt(s.median_lead_steps, '+.0f'):>9} {_fmt(s.median_lead_intervals, '+.1f'):>9} "
        f"{_fmt(row.auroc, '.3f'):>8} {_fmt(row.threshold, '.3g'):>8} {(_fmt(100 * row.swept, '.0f') + '%') if not math.isnan(row.swept) else '-':>6}"
    )


def print_table(rows: Sequence[Row], stream: TextIO) -> None:
    print(HEADER, file=stream)
    print(SUBHEADER, file=stream)
    print("-" * len(HEADER), file=stream)
    for split in SPLITS:
        for row in rows:
            if row.split == split:
                print(format_row(row), file=stream)


def label_summary(data: Mapping[str, RunData], stream: TextIO) -> None:
    counts = Counter((d.spec.split, d.label.intent, d.label.label) for d in data.values())
    print("Labels (split, intent -> ground-truth label: runs):", file=stream)
    for (split, intent, label), n in sorted(counts.items()):
        print(f"  {split:<11} {intent:<15} -> {label:<8} {n}", file=stream)
    odd = [
        d
        for d in data.values()
        if (d.label.label == "benign") or (d.label.intent in ("healthy", "control") and d.label.failing)
    ]
    for d in sorted(odd, key=lambda d: d.spec.name):
        print(
            f"  note: {d.spec.name} built as {d.label.intent}, labelled {d.label.label} "
            f"{d.label.criteria} loss_ratio {d.label.loss_ratio:.2f}",
            file=stream,
        )
    crit = Counter(min(d.label.criteria, key=d.label.criteria.get) for d in data.values() if d.label.failing)
    print(f"  first criterion of failing runs: {dict(crit)}", file=stream)


def breakdown(result: RuleSetResult, data: Mapping[str, RunData], stream: TextIO) -> None:
    """Per intent: runs detected (in time) and the median lead, split by split."""
    print(f"\nPer failure mode, {result.name} rules (any warning+):", file=stream)
    for split in SPLITS:
        by_intent: dict[str, list] = {}
        for d in data.values():
            if d.spec.split == split:
                by_intent.setdefault(d.label.intent, []).append(d.label)
        for intent, labels in sorted(by_intent.items()):
            outcomes = {lab.name: score.outcome_from_steps(lab, result.steps(lab.name)) for lab in labels}
            s = score.summarize(labels, outcomes)
            if s.n_failing:
                text = (
                    f"detected {s.detected}/{s.n_failing}, in time {s.in_time}, "
                    f"median lead {_fmt(s.median_lead_intervals, '+.1f')} intervals"
                )
            elif s.n_negative:
                text = f"negatives flagged {s.flagged}/{s.n_negative}"
            else:
                text = "no scored run"
            if s.pre_event:
                text += f", pre-event alarms {s.pre_event}"
            benign = [lab for lab in labels if lab.label == "benign"]
            if benign:
                loud = sum(1 for lab in benign if outcomes[lab.name].first_any is not None)
                text += f"; benign by ground truth (not scored): {len(benign)}, flagged {loud}"
            print(f"  {split:<11} {intent:<15} {text}", file=stream)


def first_rules(result: RuleSetResult, data: Mapping[str, RunData], stream: TextIO) -> None:
    """Which rule fires first on each failing run, and which fire on negatives."""
    firsts: Counter = Counter()
    negatives: Counter = Counter()
    for run, d in data.items():
        fired = [a for a in result.alerts[run] if a.level in score.ALERT_LEVELS]
        if d.label.failing:
            after = [a for a in fired if a.step >= d.label.cause]
            if after:
                firsts[min(after, key=lambda a: a.step).rule] += 1
        elif d.label.negative:
            for rule in {a.rule for a in fired}:
                negatives[rule] += 1
    print(
        f"  {result.name}: first rule on failing runs {dict(firsts)}; negatives flagged by {dict(negatives)}",
        file=stream,
    )


def paired_lead(
    result: RuleSetResult, base: BaselineResult, data: Mapping[str, RunData], split: str
) -> tuple[float, float, float, int]:
    diffs = []
    for d in data.values():
        lab = d.label
        if d.spec.split != split or not lab.failing:
            continue
        rule_det = score.outcome_from_steps(lab, result.steps(lab.name)).detected
        base_det = score.outcome_from_series(lab, base.series[lab.name], base.calibrated).detected
        diffs.append(score.lead_intervals(lab, rule_det) - score.lead_intervals(lab, base_det))
    med, lo, hi = score.paired_bootstrap(diffs)
    return med, lo, hi, len(diffs)


def _best_cheap(
    baselines: Sequence[BaselineResult], data: Mapping[str, RunData], split: str
) -> BaselineResult:
    labels = _split_labels(data, split)

    def key(r: BaselineResult) -> tuple:
        outcomes = {
            lab.name: score.outcome_from_series(lab, r.series[lab.name], r.calibrated) for lab in labels
        }
        s = score.summarize(labels, outcomes)
        return (s.in_time, s.detected, -s.flagged, -(s.median_lead_intervals if s.leads_intervals else 1e9))

    return max((r for r in baselines if r.baseline.cheap and r.baseline.source == "signals"), key=key)


def run_report(
    specs: Sequence[RunSpec], out: Path, *, quick: bool = False, stream: TextIO = sys.stdout
) -> int:
    data = load_suite(specs, out)
    if quick:
        from .quick import check_quick

        return check_quick(data, stream)
    label_summary(data, stream)
    results = {name: run_rule_set(name, factory, data) for name, factory in RULE_SETS.items()}
    baselines = run_baselines(data)
    rows = []
    for result in results.values():
        rows += rule_rows(result, data)
    proposed = {r.split: r.summary.flagged for r in rows if r.detector == "package: any warning+"}
    rows += baseline_rows(baselines, data, proposed)
    rows += baseline_rows(run_baselines(data, KSCORES), data, proposed)
    print("", file=stream)
    print_table(rows, stream)
    for result in results.values():
        breakdown(result, data, stream)
    print("", file=stream)
    for result in results.values():
        first_rules(result, data, stream)
    targets(results["package"], baselines, data, stream)
    return 0


def targets(
    result: RuleSetResult, baselines: Sequence[BaselineResult], data: Mapping[str, RunData], stream: TextIO
) -> dict[str, bool]:
    split = "heldout"
    labels = _split_labels(data, split)
    outcomes = {lab.name: score.outcome_from_steps(lab, result.steps(lab.name)) for lab in labels}
    s = score.summarize(labels, outcomes)
    spike = next(r for r in baselines if r.baseline.name == "loss_spike")
    spike_out = {
        lab.name: score.outcome_from_series(lab, spike.series[lab.name], spike.calibrated) for lab in labels
    }
    spike_s = score.summarize(labels, spike_out)
    best = _best_cheap(baselines, data, split)
    best_at_fa, best_thr = score.recall_at_flagged(best.sweeps[split], s.flagged)
    med, lo, hi, n = paired_lead(result, best, data, split)
    spike_lead = [score.lead_intervals(lab, spike_out[lab.name].detected) for lab in labels if lab.failing]
    rule_lead = [score.lead_intervals(lab, outcomes[lab.name].detected) for lab in labels if lab.failing]
    checks = {
        "recall >= 90% (warning+)": s.recall >= 0.9,
        "false alarms <= 5% of healthy + controls": s.fa_rate <= 0.05,
        "median lead <= 0 intervals": s.median_lead_intervals <= 0,
        "earlier than the loss-spike baseline (median lead, misses late)": statistics.median(rule_lead)
        < statistics.median(spike_lead),
        "recall >= best cheap baseline at the same false-alarm count": s.recall_in_time >= best_at_fa - 1e-9,
    }
    print(f"\nTargets on the held-out half ({s.n_failing} failing, {s.n_negative} negatives):", file=stream)
    print(
        f"  package rules: recall {s.detected}/{s.n_failing} ({100 * s.recall:.0f}%), in time {s.in_time}, "
        f"false alarms {s.flagged}/{s.n_negative} ({100 * s.fa_rate:.1f}%), median lead "
        f"{_fmt(s.median_lead_intervals, '+.1f')} intervals ({_fmt(s.median_lead_steps, '+.0f')} steps)",
        file=stream,
    )
    print(
        f"  loss-spike baseline (threshold {spike.calibrated:.3g}): recall {spike_s.detected}/{spike_s.n_failing}, "
        f"median lead over all failing runs (misses late) {statistics.median(spike_lead):+.1f} vs rules "
        f"{statistics.median(rule_lead):+.1f} intervals",
        file=stream,
    )
    print(
        f"  best cheap baseline {best.baseline.name}: best in-time recall at <= {s.flagged} flagged negatives "
        f"(held-out sweep, oracle threshold {_fmt(best_thr, '.3g')}): {_fmt(100 * best_at_fa, '.0f')}% vs rules "
        f"{100 * s.recall_in_time:.0f}%",
        file=stream,
    )
    print(
        f"  paired lead (rules - {best.baseline.name} at its calibrated threshold), {n} failing runs: median "
        f"{_fmt(med, '+.1f')} intervals, 95% bootstrap [{_fmt(lo, '+.1f')}, {_fmt(hi, '+.1f')}]",
        file=stream,
    )
    for name, ok in checks.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}", file=stream)
    return checks


def replay_stores(paths: Sequence[Path], stream: TextIO = sys.stdout) -> int:
    """Every run of every store through the package rules; prints warning+ alerts, counts info.
    (A store alone has no per-head figures: the weights-only rule stays silent here.)"""
    from .replay import load_snapshots, store_runs

    for path in paths:
        for run_id, name in store_runs(path):
            snapshots = load_snapshots(path, run_id=run_id)
            last = snapshots[-1] if snapshots else None
            t = f"{last.T_over_tau:.3f}" if last is not None and last.T_over_tau is not None else "-"
            print(
                f"{path} run {name!r}: {len(snapshots)} snapshots, last step {last.step if last else '-'}, T/tau {t}",
                file=stream,
            )
            for set_name, factory in RULE_SETS.items():
                fired = replay(snapshots, factory())
                loud = [a for a in fired if a.level in score.ALERT_LEVELS]
                n_info = sum(1 for a in fired if a.level == "info")
                print(f"  {set_name}: {len(loud)} warning/critical, {n_info} info", file=stream)
                for a in loud:
                    print(f"    [{a.level}] {a.rule} at step {a.step}: {a.message}", file=stream)
    return 0


def demo_check(out: Path, steps: int | None = None, stream: TextIO = sys.stdout) -> int:
    """Train the demo's recipe (HF Trainer) with the probe, then print its ground truth and both rule sets' alerts.
    The ground truth's logit reference is the suite's LLaMA GQA healthy runs when ``out`` holds none of its own."""
    from .democheck import train_demo
    from .labels import label_run
    from .replay import load_snapshots
    from .train import STORE, load_signals

    spec = train_demo(out, steps)
    directory = Path(out) / spec.name
    sig = load_signals(directory)
    label = label_run(sig, {}, {})
    h = [min(row) for row in sig["attn_entropy"]]
    g = [max(row) for row in sig["attn_logit_max"]]
    print(
        f"demo recipe, {spec.steps} steps, every {spec.every}: loss {sig['loss'][0]:.2f} -> "
        f"{statistics.median(sig['loss'][-20:]):.2f}; attention entropy (min layer) {h[0]:.2f} -> {h[-1]:.2f}, "
        f"lowest {min(h):.2f}; max logit {max(g):.0f}; ground truth (entropy / divergence criteria): "
        f"{label.label} {label.criteria}",
        file=stream,
    )
    from .data import _extras

    snapshots = load_snapshots(directory / STORE, _extras(sig))
    for set_name, factory in RULE_SETS.items():
        fired = replay(snapshots, factory())
        loud = [a for a in fired if a.level in score.ALERT_LEVELS]
        print(
            f"  {set_name}: {len(loud)} warning/critical, {sum(a.level == 'info' for a in fired)} info",
            file=stream,
        )
        for a in loud:
            print(f"    [{a.level}] {a.rule} at step {a.step}: {a.message}", file=stream)
    return 0


def demo_variants_report(specs: Sequence[RunSpec], out: Path, stream: TextIO = sys.stdout) -> int:
    """Per demo variant: the lowest attention entropy (min over layers), the first step below the ground truth's
    0.3 nats, the mean loss of the last 50 steps, the largest weights-only logit bound and its growth, and the
    package rules' warnings."""
    from .data import load_suite

    data = load_suite(specs, out)
    print(
        f"{'run':<40} {'min H':>6} {'H<0.3 at':>8} {'loss':>6} {'bound':>6} {'growth':>7}  warnings",
        file=stream,
    )
    for name, d in data.items():
        sig = d.signals
        h = [min(row) for row in sig["attn_entropy"]]
        below = next((s for s, v in zip(sig["steps"], h) if v < 0.3), None)
        rows = sig["qk_head_norms"]
        bound = max(v for r in rows for heads in r for v in heads)
        growth = max(
            v / rows[0][i][j] for r in rows for i, heads in enumerate(r) for j, v in enumerate(heads)
        )
        loss = statistics.fmean(sig["loss"][-50:])
        fired = [f"{a.rule}@{a.step}" for a in replay(d.snapshots, default_rule_set()) if a.level != "info"]
        print(
            f"{name:<40} {min(h):>6.2f} {below if below is not None else '-':>8} {loss:>6.3f} {bound:>6.0f} "
            f"{growth:>6.0f}x  {', '.join(fired[:3]) or '-'}",
            file=stream,
        )
    return 0

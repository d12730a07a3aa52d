"""``--quick``: a handful of short runs and robust assertions (the CI test): every run's ground truth is what it
was built to be, every failing run is flagged (warning or critical) by the package rules at or after its cause,
no healthy run or control raises a warning or critical, and the replay reproduces the live monitor's alerts."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from . import score
from .data import RunData
from .labels import Label


def _bound_margin(d: RunData) -> str:
    """The largest weights-only logit bound of the run and its growth, against the rule's 100 / 50x."""
    rows = d.signals["qk_head_norms"]
    if not rows:
        return "no attention heads"
    first = rows[0]
    bound = max(v for r in rows for heads in r for v in heads)
    growth = max(v / first[i][h] for r in rows for i, heads in enumerate(r) for h, v in enumerate(heads))
    return f"max bound {bound:.0f} (rule: 100), max growth x{growth:.0f} (rule: x50)"


def _in_time(d: RunData, lab: Label, fired: list) -> bool:
    """Flagged at or before the first snapshot at or after the onset (lead <= 0 snapshot intervals)."""
    seen = [s.step for s in d.snapshots if s.step >= lab.onset]
    first = min((a.step for a in fired if a.step >= lab.cause), default=None)
    return first is not None and bool(seen) and first <= seen[0]


def replay_fidelity(stream: TextIO, steps: int = 40) -> bool:
    """A short run with the package's default rules live; its stored alerts must equal the replay's. The store
    does not keep the per-head logit bounds (the replay reads them from a suite run's signals), so
    ``attention_logit_bound`` is left out of this comparison; its live firing is checked by the package's tests."""
    import torch

    from weibull_monitor import RunStore, WeibullMonitor, default_rules

    from ._toy import byte_batches
    from .models import build_model
    from .replay import load_snapshots, replay

    model = build_model("llama_mha", 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-1, weight_decay=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "live.sqlite"
        monitor = WeibullMonitor(model, optimizer, every=10, store=str(path), run_name="live")
        batches = byte_batches(8, 64, seed=0)
        monitor.observe(0)
        for step in range(1, steps + 1):
            batch = next(batches)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.observe(step)
        monitor.close()
        store = RunStore(path)
        live = {
            (a["step"], a["rule"], a["key"], a["level"])
            for a in store.alerts()
            if a["rule"] != "attention_logit_bound"
        }
        store.close()
        rules = [rule for rule in default_rules() if rule.rule_name != "attention_logit_bound"]
        replayed = {(a.step, a.rule, a.key, a.level) for a in replay(load_snapshots(path), rules)}
    same = live == replayed and bool(live)
    print(
        f"  replay fidelity: {len(live)} live alerts, replay {'identical' if same else 'DIFFERENT'}",
        file=stream,
    )
    return same


def check_quick(data: Mapping[str, RunData], stream: TextIO) -> int:
    from .report import RULE_SETS, run_rule_set

    result = run_rule_set("package", RULE_SETS["package"], data)
    failures = []
    for name, d in sorted(data.items()):
        lab = d.label
        fired = [a for a in result.alerts[name] if a.level in score.ALERT_LEVELS]
        first = min(fired, key=lambda a: a.step) if fired else None
        expect_failing = lab.intent not in ("healthy", "control")
        line = (
            f"  {name:<48} label {lab.label:<8} onset {lab.onset!s:>5}  first warning+ "
            f"{(first.rule + ' @' + str(first.step)) if first else '-'}"
        )
        print(line, file=stream)
        print(f"      {_bound_margin(d)}", file=stream)
        if expect_failing != lab.failing:
            failures.append(f"{name}: ground truth says {lab.label}, built as {lab.intent}")
        elif lab.failing and not any(a.step >= lab.cause for a in fired):
            failures.append(f"{name}: failing (onset {lab.onset}) but no warning or critical alert")
        elif lab.failing and not _in_time(d, lab, fired):
            failures.append(f"{name}: flagged after the first snapshot that could see the onset {lab.onset}")
        elif lab.negative and fired:
            failures.append(f"{name}: {lab.label} run raised {[(a.rule, a.step, a.level) for a in fired]}")
    if not replay_fidelity(stream):
        failures.append("the replay does not reproduce the live monitor's alerts")
    for failure in failures:
        print(f"  FAIL {failure}", file=stream)
    print(f"quick: {'OK' if not failures else f'{len(failures)} FAILED'}", file=stream)
    return 0 if not failures else 1

"""Crash safety: a training run SIGKILLed 20 times at random moments while it writes snapshots, and
restarted each time from its last checkpoint, leaves a store identical to that of an uninterrupted run.

The campaign runs in tests/robustness/fault_scripts/crash_campaign.py (forked lives of one training run; see its docstring
for the three ways a life is killed). Here: after every kill, the store as the kill left it is complete (every
committed snapshot has all its fits and aggregates, nothing of an uncommitted one is visible, SQLite's integrity
check passes); at the end the store holds every step once, the same fits and the same alerts (so the alert
counters were restored) as the reference run.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "fault_scripts" / "crash_campaign.py"
KILLS = 20


def check_complete(path: Path) -> list[int]:
    """Assert the store at ``path`` holds only complete snapshots; return their steps."""
    conn = sqlite3.connect(path)  # opening it replays the WAL, as a restarted run does
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        snapshots = conn.execute("SELECT step, n_matrices FROM snapshots ORDER BY step").fetchall()
        steps = [s for s, _ in snapshots]
        for step, n_matrices in snapshots:
            (fits,) = conn.execute("SELECT COUNT(*) FROM fits WHERE step = ?", (step,)).fetchone()
            (aggs,) = conn.execute("SELECT COUNT(*) FROM aggregates WHERE step = ?", (step,)).fetchone()
            assert fits == n_matrices > 0 and aggs > 0, (step, fits, n_matrices, aggs)
        for table in ("fits", "aggregates", "alerts"):
            orphans = conn.execute(
                f"SELECT DISTINCT step FROM {table} WHERE step NOT IN (SELECT step FROM snapshots)"
            ).fetchall()
            assert orphans == [], (table, orphans)  # no part of an uncommitted snapshot
        state = conn.execute("SELECT step FROM state").fetchone()
        assert state is None or state[0] == (steps[-1] if steps else None)
        assert steps == list(range(len(steps)))  # no gap
        return steps
    finally:
        conn.close()


def table(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.trains
@pytest.mark.slow
def test_sigkill_during_snapshot_writes_then_resume(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(KILLS), "20261128"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kills = report["kills"]
    assert len(kills) >= KILLS
    assert sum(k["in_write"] for k in kills) >= 3  # several kills landed inside a snapshot transaction
    for kill in kills:
        copy = Path(kill["copy"]) / "crash.sqlite"
        if copy.exists():
            check_complete(copy)

    crash, reference = tmp_path / "crash.sqlite", tmp_path / "reference.sqlite"
    steps = check_complete(crash)
    assert steps == list(range(report["total_steps"] + 1))  # every step once: none missing, none twice
    assert check_complete(reference) == steps
    fits_sql = "SELECT step, name, k, scale, r2, n, ok FROM fits ORDER BY step, name"
    assert table(crash, fits_sql) == table(reference, fits_sql)  # the resumed training is the same training
    agg_sql = "SELECT step, metric, value FROM aggregates ORDER BY step, metric"
    assert table(crash, agg_sql) == table(reference, agg_sql)  # T/tau and scale growth restored too
    alert_sql = "SELECT step, rule, level, key FROM alerts ORDER BY step, alert_id"
    crash_alerts = table(crash, alert_sql)
    assert crash_alerts == table(reference, alert_sql)  # restored counters: same alerts at the same steps
    assert len(crash_alerts) == len(set(crash_alerts)) and len(crash_alerts) >= 5
    print(
        f"\ncrash campaign: {len(kills)} SIGKILLs over {report['lives']} lives, "
        f"{sum(k['in_write'] for k in kills)} inside a snapshot write "
        f"(modes: { {m: sum(k['mode'] == m for k in kills) for m in ('timed', 'in_write', 'vm')} })"
    )

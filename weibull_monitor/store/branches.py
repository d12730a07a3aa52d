"""Branches of a run: who wrote which part of its timeline, and the rewinds that replaced a part of it.

Plain functions on an open connection, called by :class:`~weibull_monitor.store.run_store.RunStore` inside its
transactions (writes) or under its lock (reads). A branch is one writer of a run: a training process, or the same
process after a rewind. Forking a branch at step s makes it the run's live branch and moves the live rows after s
of every series table into its ``*_superseded`` twin, marked with the new branch, the time and s.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from weibull_monitor.plain_data import json_dumps
from weibull_monitor.store.schema import (
    BRANCH_COLUMNS,
    SERIES_TABLES,
    SUPERSEDED,
    SUPERSEDED_COLUMNS,
    table_columns,
)

__all__ = [
    "branch_rows",
    "fork",
    "live_branch",
    "move_after",
    "superseded_summary",
    "timeline_segments",
]


def _branch_dict(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(BRANCH_COLUMNS, row))
    if out.get("dashboards") is not None:
        out["dashboards"] = json.loads(out["dashboards"])
    return out


def branch_rows(conn: sqlite3.Connection, run_id: int | None = None) -> list[dict[str, Any]]:
    """Every branch (of ``run_id``, or of every run), with ``live`` (the run's live branch) and the counts of its
    snapshots in the live timeline and among the superseded ones."""
    columns = ", ".join(f"b.{c}" for c in BRANCH_COLUMNS)
    sql = (
        f"SELECT {columns}, r.live_branch = b.branch, "
        "(SELECT COUNT(*) FROM snapshots s WHERE s.run_id = b.run_id AND s.branch = b.branch), "
        "(SELECT COUNT(*) FROM snapshots_superseded s WHERE s.run_id = b.run_id AND s.branch = b.branch), "
        "(SELECT MIN(step) FROM (SELECT step FROM snapshots s WHERE s.run_id = b.run_id AND s.branch = b.branch "
        " UNION ALL SELECT step FROM snapshots_superseded s WHERE s.run_id = b.run_id AND s.branch = b.branch)), "
        "(SELECT MAX(step) FROM (SELECT step FROM snapshots s WHERE s.run_id = b.run_id AND s.branch = b.branch "
        " UNION ALL SELECT step FROM snapshots_superseded s WHERE s.run_id = b.run_id AND s.branch = b.branch)) "
        "FROM branches b JOIN runs r ON r.run_id = b.run_id"
        + (" WHERE b.run_id = ?" if run_id is not None else "")
        + " ORDER BY b.run_id, b.branch"
    )
    rows = conn.execute(sql, () if run_id is None else (int(run_id),)).fetchall()
    out = []
    n = len(BRANCH_COLUMNS)
    for row in rows:
        branch = _branch_dict(tuple(row)[:n])
        live, n_live, n_gone, first, last = tuple(row)[n:]
        branch.update(
            live=bool(live), n_live=n_live, n_superseded_rows=n_gone, first_step=first, last_step=last
        )
        out.append(branch)
    return out


def live_branch(conn: sqlite3.Connection, run_id: int) -> int:
    row = conn.execute("SELECT live_branch FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
    if row is None:
        raise KeyError(f"no run with id {run_id}")
    return int(row[0])


def superseded_summary(conn: sqlite3.Connection, run_id: int, step: int) -> list[dict[str, Any]]:
    """What a rewind of ``run_id`` to ``step`` would supersede: per branch with live snapshots after ``step``, the
    branch's row (writer, pid, host, dashboards, last write) with the first and last such step and their count."""
    rows = conn.execute(
        "SELECT branch, COUNT(*), MIN(step), MAX(step) FROM snapshots WHERE run_id = ? AND step > ? "
        "GROUP BY branch ORDER BY branch",
        (int(run_id), int(step)),
    ).fetchall()
    out = []
    columns = ", ".join(BRANCH_COLUMNS)
    for branch, count, first, last in rows:
        info = conn.execute(
            f"SELECT {columns} FROM branches WHERE run_id = ? AND branch = ?", (int(run_id), branch)
        ).fetchone()
        entry = _branch_dict(tuple(info)) if info else {"run_id": run_id, "branch": branch}
        entry.update(first_step=first, last_step=last, n_snapshots=count)
        out.append(entry)
    return out


def move_after(conn: sqlite3.Connection, run_id: int, step: int, by_branch: int, now: float) -> int:
    """Move the live rows of ``run_id`` after ``step`` into the superseded tables (marked ``by_branch``, ``now``,
    ``step``). Returns the number of snapshots moved."""
    moved = 0
    for table in SERIES_TABLES:
        twin = SUPERSEDED[table]
        columns = table_columns(conn, table)
        _ensure_columns(conn, twin, columns, table)
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(SUPERSEDED_COLUMNS)
        cursor = conn.execute(
            f"INSERT INTO {twin} ({names}, {marks}) SELECT {names}, ?, ?, ? FROM {table} "
            "WHERE run_id = ? AND step > ?",
            (int(by_branch), float(now), int(step), int(run_id), int(step)),
        )
        if table == "snapshots":
            moved = cursor.rowcount
        conn.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (int(run_id), int(step)))
    return moved


def _ensure_columns(conn: sqlite3.Connection, twin: str, columns: Sequence[str], table: str) -> None:
    """A column the live table gained (a new record field) also exists in its twin."""
    present = set(table_columns(conn, twin))
    types = {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({table})")}
    for column in columns:
        if column not in present:
            conn.execute(f'ALTER TABLE {twin} ADD COLUMN "{column}" {types.get(column) or ""}')


def fork(
    conn: sqlite3.Connection,
    run_id: int,
    step: int,
    *,
    writer: Mapping[str, Any] | None = None,
    reason: str = "resume",
    message: str | None = None,
    dashboards: Sequence[Mapping[str, Any]] | None = None,
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Start a new live branch of ``run_id`` at ``step`` (inside the caller's transaction).

    Live rows after ``step`` move to the superseded tables. A run whose live branch has no writer yet and no
    snapshot at all (a run just created) is claimed instead of forked. ``state`` (the monitor state at ``step``)
    becomes the run's saved state; without it the saved state is the one written with the last live snapshot.
    Returns ``branch``, ``parent``, ``claimed``, ``previous`` (the live branch before) and ``superseded`` (per branch:
    its row, the first and last superseded step and their count).
    """
    run_id, step = int(run_id), int(step)
    now = time.time()
    writer = dict(writer or {})
    live = live_branch(conn, run_id)
    columns = ", ".join(BRANCH_COLUMNS)
    previous_row = conn.execute(
        f"SELECT {columns} FROM branches WHERE run_id = ? AND branch = ?", (run_id, live)
    ).fetchone()
    previous = _branch_dict(tuple(previous_row)) if previous_row else None
    identity = (writer.get("writer"), writer.get("pid"), writer.get("host"))
    empty = not conn.execute(
        "SELECT 1 FROM snapshots WHERE run_id = ? UNION ALL SELECT 1 FROM snapshots_superseded WHERE run_id = ? "
        "LIMIT 1",
        (run_id, run_id),
    ).fetchone()
    if previous is not None and previous.get("writer") is None and empty:
        conn.execute(
            "UPDATE branches SET writer = ?, pid = ?, host = ?, reason = ?, fork_step = ?, message = ?, "
            "dashboards = COALESCE(?, dashboards) WHERE run_id = ? AND branch = ?",
            (*identity, reason, step, message, _dashboards(dashboards), run_id, live),
        )
        if state is not None:
            _save_head(conn, run_id, step, state)
        return {"branch": live, "parent": previous.get("parent"), "claimed": True, "previous": None,
                "superseded": [], "fork_step": step}  # fmt: skip
    summary = superseded_summary(conn, run_id, step)
    (new,) = conn.execute(
        "SELECT COALESCE(MAX(branch), -1) + 1 FROM branches WHERE run_id = ?", (run_id,)
    ).fetchone()
    moved = [s for s in summary if s.get("n_snapshots")]
    conn.execute(
        f"INSERT INTO branches ({columns}) VALUES ({', '.join('?' for _ in BRANCH_COLUMNS)})",
        (
            run_id,
            new,
            live,
            step,
            now,
            reason,
            *identity,
            None,
            sum(s["n_snapshots"] for s in moved),
            min((s["first_step"] for s in moved), default=None),
            max((s["last_step"] for s in moved), default=None),
            _dashboards(dashboards),
            message,
        ),
    )
    if moved:
        move_after(conn, run_id, step, new, now)
    conn.execute("UPDATE runs SET live_branch = ? WHERE run_id = ?", (new, run_id))
    if state is not None:
        _save_head(conn, run_id, step, state)
    elif moved:
        _restore_head(conn, run_id)
    return {"branch": new, "parent": live, "claimed": False, "previous": previous, "superseded": summary,
            "fork_step": step}  # fmt: skip


def _dashboards(dashboards: Sequence[Mapping[str, Any]] | None) -> str | None:
    return None if dashboards is None else json_dumps([dict(d) for d in dashboards])


def _save_head(conn: sqlite3.Connection, run_id: int, step: int | None, state: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO state (run_id, step, state) VALUES (?, ?, ?) "
        "ON CONFLICT(run_id) DO UPDATE SET step = excluded.step, state = excluded.state",
        (run_id, step, json.dumps(state, allow_nan=True)),
    )


def _restore_head(conn: sqlite3.Connection, run_id: int) -> None:
    """The run's saved state becomes the one written with its last live snapshot (none left: no saved state)."""
    row = conn.execute(
        "SELECT s.step, st.state FROM snapshots s JOIN snapshot_states st ON st.run_id = s.run_id "
        "AND st.branch = s.branch AND st.step = s.step WHERE s.run_id = ? ORDER BY s.step DESC LIMIT 1",
        (run_id,),
    ).fetchone()
    if row is None:
        conn.execute("DELETE FROM state WHERE run_id = ?", (run_id,))
    else:
        conn.execute(
            "INSERT INTO state (run_id, step, state) VALUES (?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET step = excluded.step, state = excluded.state",
            (run_id, row[0], row[1]),
        )


def timeline_segments(conn: sqlite3.Connection, run_id: int, branch: int) -> list[tuple[int, int | None]]:
    """The timeline of ``branch`` as its writer made it: ``[(branch, None), (parent, fork), (grandparent, ...)]``
    meaning every row of ``branch``, the rows of its parent up to its fork step, and so on up to the root."""
    rows = {
        int(b): (p, f)
        for b, p, f in conn.execute(
            "SELECT branch, parent, fork_step FROM branches WHERE run_id = ?", (int(run_id),)
        ).fetchall()
    }
    if int(branch) not in rows:
        raise KeyError(f"run {run_id} has no branch {branch}")
    segments: list[tuple[int, int | None]] = [(int(branch), None)]
    limit: int | None = None
    current = int(branch)
    seen = {current}
    while True:
        parent, fork_step = rows[current]
        if parent is None or int(parent) in seen or int(parent) not in rows:
            return segments
        if fork_step is not None:
            limit = int(fork_step) if limit is None else min(limit, int(fork_step))
        current = int(parent)
        seen.add(current)
        segments.append((current, limit))

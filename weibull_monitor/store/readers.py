"""The run store's readers: the live timeline by default, one branch's timeline or every row on request.

``branch=None`` (default): the live timeline, exactly one row per step (what training ended up doing).
``branch=<id>``: the timeline that branch's writer made (its own rows, live or superseded, and its ancestors' rows
up to where it forked). ``branch="all"``: every row, live and superseded, each with its ``branch`` and, when
superseded, ``superseded_by``, ``superseded_at`` and ``rewind_step``.

A version-1 store opened without migrating it (a read-only reader) has no branches: all of it is branch 0, live.
"""

from __future__ import annotations

import json
from typing import Any

from weibull_monitor.store import branches as branch_ops
from weibull_monitor.store.schema import JSON_COLUMNS, SERIES_TABLES, SUPERSEDED, SUPERSEDED_COLUMNS, TABLES

__all__ = ["StoreReaders"]

_ORDER = {
    "snapshots": "run_id, step",
    "fits": "run_id, step, name",
    "aggregates": "run_id, step, metric",
    "alerts": "run_id, step, alert_id",
}


class StoreReaders:
    """Reader methods of :class:`~weibull_monitor.store.run_store.RunStore` (uses its ``_conn`` and ``_lock``)."""

    _conn: Any
    _lock: Any
    _has_branches: bool = False

    # ---------------------------------------------------------------------------------------- plumbing

    def _branched(self) -> bool:
        """True once the file has the version-2 tables (always, except an unmigrated version-1 store)."""
        if not self._has_branches:
            with self._lock:
                row = self._conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'branches'"
                ).fetchone()
            self._has_branches = row is not None
        return self._has_branches

    def _rows(self, sql: str, params: list[Any], table: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        json_columns = JSON_COLUMNS.get(table, ())
        out = []
        for row in rows:
            record = dict(row)
            for column in json_columns:
                if record.get(column) is not None:
                    record[column] = json.loads(record[column])
            out.append(record)
        return out

    def _select(self, table: str, where: dict[str, Any], order: str) -> list[dict[str, Any]]:
        clauses = [f'"{column}" = ?' for column, value in where.items() if value is not None]
        params = [value for value in where.values() if value is not None]
        sql = (
            f"SELECT * FROM {table}"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY {order}"
        )
        return self._rows(sql, params, table)

    def _columns(self, table: str) -> list[str]:
        with self._lock:
            return [row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")]

    def _series(
        self, table: str, where: dict[str, Any], branch: int | str | None, run_id: int | None
    ) -> list[dict[str, Any]]:
        """Rows of a series table: the live timeline, one branch's timeline, or everything ("all")."""
        order = _ORDER[table]
        where = {"run_id": run_id, **where}
        if branch is None:
            return self._select(table, where, order)
        if not self._branched():  # version 1: everything is branch 0, live
            if branch not in ("all", 0):
                return []
            rows = self._select(table, where, order)
            for row in rows:
                row.update(branch=0, **dict.fromkeys(SUPERSEDED_COLUMNS))
            return rows
        columns = self._columns(table)
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(SUPERSEDED_COLUMNS)
        clauses = [f'"{column}" = ?' for column, value in where.items() if value is not None]
        params = [value for value in where.values() if value is not None]
        if branch == "all":
            scope, scope_params = "", []
        else:
            if run_id is None:
                raise ValueError("branch=<id> needs run_id: branch ids are per run")
            with self._lock:
                segments = branch_ops.timeline_segments(self._conn, int(run_id), int(branch))
            parts, scope_params = [], []
            for segment, limit in segments:
                parts.append("(branch = ?" + ("" if limit is None else " AND step <= ?") + ")")
                scope_params += [segment] + ([] if limit is None else [limit])
            scope = "(" + " OR ".join(parts) + ")"
        condition = " AND ".join([*clauses, scope] if scope else clauses)
        condition = f" WHERE {condition}" if condition else ""
        live = (
            f"SELECT {names}, NULL AS superseded_by, NULL AS superseded_at, NULL AS rewind_step FROM {table}"
        )
        gone = f"SELECT {names}, {marks} FROM {SUPERSEDED[table]}"
        sql = f"{live}{condition} UNION ALL {gone}{condition} ORDER BY {order}, branch"
        return self._rows(sql, [*params, *scope_params, *params, *scope_params], table)

    # ---------------------------------------------------------------------------------------- runs, branches

    def runs(self) -> list[dict[str, Any]]:
        return self._select("runs", {}, "run_id")

    def run_id(self, name: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT run_id FROM runs WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def live_branch(self, run_id: int) -> int:
        """The branch whose writer the run's live timeline follows now."""
        if not self._branched():
            return 0
        with self._lock:
            return branch_ops.live_branch(self._conn, run_id)

    def branches(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Every branch: its parent, fork step, time, reason, writer (uuid, pid, host), last write, dashboards, the
        snapshots its creation superseded (``n_superseded``, ``superseded_first``/``_last``), ``live``, and its
        snapshot counts (``n_live``, ``n_superseded_rows``, ``first_step``, ``last_step``)."""
        if not self._branched():
            return [
                {"run_id": r["run_id"], "branch": 0, "parent": None, "fork_step": None, "live": True}
                for r in self.runs()
                if run_id is None or r["run_id"] == run_id
            ]
        with self._lock:
            return branch_ops.branch_rows(self._conn, run_id)

    def rewinds(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """The rewinds that replaced part of a timeline: branches whose fork superseded snapshots, oldest first
        (``step``: the fork step, ``time``, ``branch``, ``superseded_first``/``_last``, ``n_superseded``)."""
        return [
            {
                "run_id": b["run_id"],
                "step": b["fork_step"],
                "time": b["created"],
                "branch": b["branch"],
                "parent": b["parent"],
                "reason": b["reason"],
                "n_superseded": b["n_superseded"],
                "superseded_first": b["superseded_first"],
                "superseded_last": b["superseded_last"],
            }
            for b in self.branches(run_id)
            if b.get("n_superseded")
        ]

    # ---------------------------------------------------------------------------------------- series

    def snapshots(
        self, run_id: int | None = None, *, branch: int | str | None = None
    ) -> list[dict[str, Any]]:
        return self._series("snapshots", {}, branch, run_id)

    def steps(self, run_id: int | None = None, *, branch: int | str | None = None) -> list[int]:
        return [row["step"] for row in self.snapshots(run_id, branch=branch)]

    def fits(
        self, step: int | None = None, run_id: int | None = None, *, branch: int | str | None = None
    ) -> list[dict[str, Any]]:
        return self._series("fits", {"step": step}, branch, run_id)

    def aggregates(
        self, run_id: int | None = None, step: int | None = None, *, branch: int | str | None = None
    ) -> list[dict[str, Any]]:
        return self._series("aggregates", {"step": step}, branch, run_id)

    def alerts(self, run_id: int | None = None, *, branch: int | str | None = None) -> list[dict[str, Any]]:
        return self._series("alerts", {}, branch, run_id)

    # ---------------------------------------------------------------------------------------- state

    def load_state(self, run_id: int) -> dict[str, Any] | None:
        """The run's saved monitor state: the one written with its last live snapshot, or at its last rewind."""
        with self._lock:
            row = self._conn.execute("SELECT state FROM state WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def state_at(self, run_id: int, step: int) -> dict[str, Any] | None:
        """The monitor state written with the last live snapshot at or before ``step``: ``{"step", "branch",
        "state"}``, or None (no such snapshot, or a version-1 store, which kept only the last state)."""
        if not self._branched():
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT s.step, s.branch, st.state FROM snapshots s JOIN snapshot_states st "
                "ON st.run_id = s.run_id AND st.branch = s.branch AND st.step = s.step "
                "WHERE s.run_id = ? AND s.step <= ? ORDER BY s.step DESC LIMIT 1",
                (int(run_id), int(step)),
            ).fetchone()
        if row is None:
            return None
        return {"step": int(row[0]), "branch": int(row[1]), "state": json.loads(row[2])}

    # ---------------------------------------------------------------------------------------- pandas

    def to_pandas(self, table: str, *, run_id: int | None = None, branch: int | str | None = None) -> Any:
        """One table as a pandas DataFrame (needs pandas: ``pip install weibull-monitor[all]``). The series tables
        follow the readers: the live timeline by default, ``branch=<id>`` or ``branch="all"`` on request."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {TABLES}")
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("to_pandas needs pandas: pip install pandas") from error
        if table in SERIES_TABLES:
            rows = self._series(table, {}, branch, run_id)
        elif table == "runs":
            rows = [r for r in self.runs() if run_id is None or r["run_id"] == run_id]
        elif table == "branches":
            rows = self.branches(run_id)
        elif not self._branched() and table not in ("state",):
            rows = []
        else:
            rows = self._select(table, {"run_id": run_id}, "run_id")
        return pd.DataFrame(rows)

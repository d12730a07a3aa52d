"""RunStore: every snapshot, fit, aggregate and alert of a run in one SQLite file (standard library only).

- WAL journal: a report or notebook can read while training writes.
- Schema-versioned (table ``schema_version``); a newer, unknown version is refused with a clear error; an older one
  is migrated in place when opened (version 1 -> 2: branches; nothing rewritten or dropped).
- One transaction per snapshot: its fits, aggregates, alerts, the monitor state and the snapshot row commit
  together, so a crash never leaves a partial snapshot.
- Branches: each writer of a run writes its own branch; :meth:`RunStore.fork` (a resume or rewind to step s)
  makes a new live branch and moves the live rows after s to the ``*_superseded`` tables, marked with the branch,
  time and step of the rewind. The live tables always hold one timeline; nothing is deleted.
- A step already in the live timeline is not written twice.
- Bound parameters only (names come from models and users and may contain anything).
- Readers (:class:`~weibull_monitor.store.readers.StoreReaders`) return ``list[dict]`` of the live timeline by
  default, a branch's or every row on request; ``to_pandas(table)`` gives a DataFrame when pandas is installed.

NaN is stored as NULL (SQLite has no NaN) and read back as None.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from weibull_monitor._version import __version__
from weibull_monitor.plain_data import json_dumps, sql_value
from weibull_monitor.store import branches as branch_ops
from weibull_monitor.store.readers import StoreReaders
from weibull_monitor.store.schema import (
    FIT_COLUMNS,
    FIT_FIELDS,
    ROLE_FIELDS,
    SCHEMA_VERSION,
    STAT_FIELDS,
    SUPERSEDED,
    migrate,
)

__all__ = ["RunStore", "StoreError", "WriteResult"]


class StoreError(RuntimeError):
    """The store file cannot be used (e.g. written by a newer version of weibull-monitor)."""


class WriteResult(enum.IntEnum):
    """What :meth:`RunStore.write_snapshot` did (false only for a duplicate, so it reads as the old bool)."""

    DUPLICATE = 0  # the target already holds this step: nothing written
    LIVE = 1  # written to the live timeline
    SUPERSEDED = 2  # written to a branch another writer has replaced: kept, outside the live timeline


class RunStore(StoreReaders):
    """SQLite run store at ``path`` (created with its folder if missing). Thread-safe; one connection.

    ``timeout`` (seconds) bounds how long a write waits for a lock held by another process before it fails
    (the monitor then keeps the snapshot in memory and retries at the next one).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 1.0) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(path), timeout=timeout, check_same_thread=False, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "PRAGMA synchronous=NORMAL"
            )  # WAL + NORMAL: durable at checkpoints, never corrupt
            self._init_schema()

    # ---------------------------------------------------------------------------------------------- schema

    def _init_schema(self) -> None:
        version = None
        existing = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if existing:
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has store schema version {version}; this weibull-monitor reads up to "
                    f"{SCHEMA_VERSION}: upgrade weibull-monitor"
                )
        with self._transaction():
            migrate(self._conn, version)
            if version != SCHEMA_VERSION:
                self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # ---------------------------------------------------------------------------------------------- writes

    def open_run(self, name: str, meta: Mapping[str, Any] | None = None) -> int:
        """The id of run ``name``, created with ``meta`` (and its branch 0) if new; same name -> same id.
        ``meta`` keys ``package_version``, ``model_summary``, ``optimizer``, ``attention_kind``, ``expectation``
        fill their columns; everything else goes to the ``meta`` JSON column."""
        meta = dict(meta or {})
        with self._transaction():
            row = self._conn.execute("SELECT run_id FROM runs WHERE name = ?", (name,)).fetchone()
            if row:
                return int(row[0])
            created = time.time()
            cursor = self._conn.execute(
                "INSERT INTO runs (name, created, package_version, model_summary, optimizer, attention_kind, "
                "expectation, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    created,
                    str(meta.pop("package_version", __version__)),
                    json_dumps(meta.pop("model_summary", None)),
                    json_dumps(meta.pop("optimizer", None)),
                    meta.pop("attention_kind", None),
                    meta.pop("expectation", None),
                    json_dumps(meta),
                ),
            )
            run_id = int(cursor.lastrowid)
            self._conn.execute(
                "INSERT INTO branches (run_id, branch, created, reason) VALUES (?, 0, ?, 'new run')",
                (run_id, created),
            )
            return run_id

    def fork(
        self,
        run_id: int,
        step: int,
        *,
        writer: Mapping[str, Any] | None = None,
        reason: str = "resume",
        message: str | None = None,
        dashboards: Sequence[Mapping[str, Any]] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start a new live branch of ``run_id`` at ``step`` (one transaction): a resume or rewind to ``step``.

        The live snapshots after ``step``, with their fits, aggregates and alerts, move to the superseded tables,
        marked with the new branch, the time and ``step``. ``writer`` (``writer`` uuid, ``pid``, ``host``) and
        ``dashboards`` (where its sinks write) identify the branch's writer; ``state`` is the monitor state at
        ``step``. A run just created (no snapshot, no writer) is claimed rather than forked. Returns the new
        ``branch``, its ``parent``, ``claimed``, ``previous`` (the former live branch's row) and ``superseded``.
        """
        with self._transaction():
            return branch_ops.fork(
                self._conn,
                run_id,
                step,
                writer=writer,
                reason=reason,
                message=message,
                dashboards=dashboards,
                state=state,
            )

    def superseded_by_rewind(self, run_id: int, step: int) -> list[dict[str, Any]]:
        """What a rewind of ``run_id`` to ``step`` would supersede now (read only; see :meth:`fork`)."""
        if not self._branched():
            return []
        with self._lock:
            return branch_ops.superseded_summary(self._conn, run_id, step)

    def has_step(self, run_id: int, step: int) -> bool:
        """True when the live timeline of the run has a snapshot at ``step``."""
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM snapshots WHERE run_id = ? AND step = ?", (run_id, int(step))
            ).fetchone()
            return row is not None

    def write_snapshot(
        self,
        run_id: int,
        snapshot: Any,
        state: Mapping[str, Any] | None = None,
        *,
        branch: int | None = None,
        dashboards: Sequence[Mapping[str, Any]] | None = None,
    ) -> WriteResult:
        """Write one snapshot (and the monitor ``state``, if given) in one transaction.

        ``branch``: the writer's branch (None: the run's live branch). The live branch writes to the live
        timeline; a branch another writer has replaced writes to the superseded tables (kept, marked, outside the
        live timeline). Returns :class:`WriteResult` (``DUPLICATE``, false, when the target already has that step,
        writing nothing). ``dashboards`` updates where the branch's sinks write.
        """
        step = int(snapshot.step)
        fit_rows = []
        stats = getattr(snapshot, "matrices", {}) or {}
        for key, fit in snapshot.fits.items():
            role = snapshot.roles.get(key)
            s = stats.get(key)
            row: dict[str, Any] = {"run_id": run_id, "step": step, "name": key}
            row["param_name"] = getattr(role, "fused_parent", None) or key
            for f in ROLE_FIELDS:
                row[f] = getattr(role, f, None)
            for f in FIT_FIELDS:
                row[f] = getattr(fit, f, None)
            for f in STAT_FIELDS:
                row[f] = getattr(s, f, None)
            fit_rows.append(tuple(sql_value(row[c]) for c in FIT_COLUMNS))
        aggregate_rows = [
            (run_id, step, metric, sql_value(value)) for metric, value in snapshot.aggregates.items()
        ]
        alert_rows = [
            (
                run_id,
                int(a.step),
                a.rule,
                a.level,
                a.key,
                json_dumps(list(a.matrices)),
                json_dumps(a.values),
                a.message,
            )
            for a in snapshot.alerts
        ]
        skipped = dict(getattr(snapshot, "skipped", {}) or {})
        snapshot_row = (
            run_id,
            step,
            sql_value(getattr(snapshot, "wall_time", None)),
            sql_value(getattr(snapshot, "duration_s", None)),
            len(snapshot.fits),
            len(skipped),
            sql_value(snapshot.T_over_tau),
            getattr(snapshot, "attention_kind", None),
            getattr(snapshot, "expectation", None),
            json_dumps(skipped),
        )
        state_json = None if state is None else json.dumps(state, allow_nan=True)
        with self._transaction():
            live = branch_ops.live_branch(self._conn, run_id)
            target = live if branch is None else int(branch)
            if target == live:
                if self._conn.execute(
                    "SELECT 1 FROM snapshots WHERE run_id = ? AND step = ?", (run_id, step)
                ).fetchone():
                    return WriteResult.DUPLICATE
                self._insert_rows("", target, (), fit_rows, aggregate_rows, alert_rows, snapshot_row)
                if state_json is not None:
                    self._save_state(run_id, step, state_json)
                result = WriteResult.LIVE
            else:
                if self._conn.execute(
                    "SELECT 1 FROM snapshots_superseded WHERE run_id = ? AND branch = ? AND step = ?",
                    (run_id, target, step),
                ).fetchone():
                    return WriteResult.DUPLICATE
                (fork_step,) = self._conn.execute(
                    "SELECT fork_step FROM branches WHERE run_id = ? AND branch = ?", (run_id, live)
                ).fetchone() or (None,)
                marks = (live, time.time(), fork_step)
                self._insert_rows(
                    "_superseded", target, marks, fit_rows, aggregate_rows, alert_rows, snapshot_row
                )
                result = WriteResult.SUPERSEDED
            if state_json is not None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO snapshot_states (run_id, branch, step, state) VALUES (?, ?, ?, ?)",
                    (run_id, target, step, state_json),
                )
            self._conn.execute(
                "UPDATE branches SET last_write = ?, dashboards = COALESCE(?, dashboards) "
                "WHERE run_id = ? AND branch = ?",
                (time.time(), None if dashboards is None else json_dumps(list(dashboards)), run_id, target),
            )
        return result

    def _insert_rows(
        self,
        suffix: str,
        branch: int,
        marks: tuple,
        fit_rows: list[tuple],
        aggregate_rows: list[tuple],
        alert_rows: list[tuple],
        snapshot_row: tuple,
    ) -> None:
        """Insert one snapshot's rows into the live tables (``suffix`` "") or their superseded twins."""
        extra = ", branch" + (", superseded_by, superseded_at, rewind_step" if marks else "")
        tail = (branch, *marks)
        more = ", ?" * len(tail)
        columns = ", ".join(FIT_COLUMNS)
        placeholders = ", ".join("?" for _ in FIT_COLUMNS)
        self._conn.executemany(
            f"INSERT INTO fits{suffix} ({columns}{extra}) VALUES ({placeholders}{more})",
            [(*r, *tail) for r in fit_rows],
        )
        self._conn.executemany(
            f"INSERT INTO aggregates{suffix} (run_id, step, metric, value{extra}) VALUES (?, ?, ?, ?{more})",
            [(*r, *tail) for r in aggregate_rows],
        )
        alert_sql = (
            'INSERT INTO alerts (run_id, step, rule, level, key, matrices, "values", message, branch) '
        )
        alert_sql += "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ids = []
        for (
            r
        ) in alert_rows:  # ids come from the live table's sequence, so moved and direct rows never collide
            ids.append(self._conn.execute(alert_sql, (*r, branch)).lastrowid)
        if marks and ids:
            marked = ", ".join("?" for _ in ids)
            self._conn.execute(
                f"INSERT INTO {SUPERSEDED['alerts']} (alert_id, run_id, step, rule, level, key, matrices, "
                f'"values", message{extra}) SELECT alert_id, run_id, step, rule, level, key, matrices, "values", '
                f"message, branch, ?, ?, ? FROM alerts WHERE alert_id IN ({marked})",
                (*marks, *ids),
            )
            self._conn.execute(f"DELETE FROM alerts WHERE alert_id IN ({marked})", ids)
        # the snapshot row goes last: a reader that sees it sees everything it refers to
        self._conn.execute(
            f"INSERT INTO snapshots{suffix} (run_id, step, wall_time, duration_s, n_matrices, n_skipped, T_over_tau, "
            f"attention_kind, expectation, skipped{extra}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?{more})",
            (*snapshot_row, *tail),
        )

    def _save_state(self, run_id: int, step: int | None, state: Mapping[str, Any] | str) -> None:
        text = state if isinstance(state, str) else json.dumps(state, allow_nan=True)
        self._conn.execute(
            "INSERT INTO state (run_id, step, state) VALUES (?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET step = excluded.step, state = excluded.state",
            (run_id, step, text),
        )

    def save_state(self, run_id: int, state: Mapping[str, Any], step: int | None = None) -> None:
        """Store the monitor's resumable state (JSON) for a run, replacing the previous one."""
        with self._transaction():
            self._save_state(run_id, step, state)

    # ---------------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

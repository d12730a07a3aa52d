"""RunStore: every snapshot, fit, aggregate and alert of a run in one SQLite file (standard library only).

- WAL journal: a report or notebook can read while training writes.
- Schema-versioned (table ``schema_version``); a newer, unknown version is refused with a clear error.
- One transaction per snapshot: its fits, aggregates, alerts, the monitor state and the snapshot row commit
  together, so a crash never leaves a partial snapshot.
- Re-opening a store for the same run name appends to that run; a step already stored is not written twice.
- Bound parameters only (names come from models and users and may contain anything).
- Readers return ``list[dict]``; ``to_pandas(table)`` gives a DataFrame when pandas is installed.

NaN is stored as NULL (SQLite has no NaN) and read back as None.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from weibull_monitor._version import __version__
from weibull_monitor.plain_data import json_dumps, sql_value
from weibull_monitor.store.access import (
    StoreError,
    check_step,
    check_writable,
    open_read_only,
    stored_version,
)
from weibull_monitor.store.schema import (
    FIT_COLUMNS,
    FIT_FIELDS,
    JSON_COLUMNS,
    ROLE_FIELDS,
    SCHEMA_VERSION,
    STAT_FIELDS,
    TABLES,
    create_schema,
)

__all__ = ["RunStore", "StoreError"]


class RunStore:
    """SQLite run store at ``path`` (created with its folder if missing). Thread-safe; one connection.

    ``timeout`` (seconds) bounds how long a write waits for a lock held by another process before it fails
    (the monitor then keeps the snapshot in memory and retries at the next one).

    ``read_only=True`` (readers: ``report``, notebooks) opens an existing store without changing anything in or
    beside the file: no table created, no WAL switch; StoreError for a file that is no run store. A writer refuses
    a database of another application (StoreError) rather than adding its tables to it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 1.0, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        self.read_only = bool(read_only)
        self._lock = threading.RLock()
        if self.read_only:
            self._conn = open_read_only(self.path, timeout, SCHEMA_VERSION)
            self._conn.row_factory = sqlite3.Row
            return
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(path), timeout=timeout, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{path}: cannot be opened as a run store ({exc})") from None
        self._conn.row_factory = sqlite3.Row
        try:
            with self._lock:
                check_writable(self._conn, self.path)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(
                    "PRAGMA synchronous=NORMAL"
                )  # WAL + NORMAL: durable at checkpoints, never corrupt
                self._init_schema()
        except (
            sqlite3.DatabaseError
        ) as exc:  # a file that is no SQLite database, ...; a lock is only transient
            self._conn.close()
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise
            raise StoreError(f"{path}: cannot be used as a run store ({exc})") from None
        except StoreError:
            self._conn.close()
            raise

    # ---------------------------------------------------------------------------------------------- schema

    def _init_schema(self) -> None:
        existing = self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if existing:
            version = stored_version(self._conn, self.path)
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has store schema version {version}; this weibull-monitor reads up to "
                    f"{SCHEMA_VERSION}: upgrade weibull-monitor"
                )
        with self._transaction():
            create_schema(self._conn)
            if self._conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
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
        """The id of run ``name``, created with ``meta`` if new (same name -> same id: a resume appends).
        ``meta`` keys ``package_version``, ``model_summary``, ``optimizer``, ``attention_kind``, ``expectation``
        fill their columns; everything else goes to the ``meta`` JSON column."""
        meta = dict(meta or {})
        with self._transaction():
            row = self._conn.execute("SELECT run_id FROM runs WHERE name = ?", (name,)).fetchone()
            if row:
                return int(row[0])
            cursor = self._conn.execute(
                "INSERT INTO runs (name, created, package_version, model_summary, optimizer, attention_kind, "
                "expectation, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    time.time(),
                    str(meta.pop("package_version", __version__)),
                    json_dumps(meta.pop("model_summary", None)),
                    json_dumps(meta.pop("optimizer", None)),
                    meta.pop("attention_kind", None),
                    meta.pop("expectation", None),
                    json_dumps(meta),
                ),
            )
            return int(cursor.lastrowid)

    def has_step(self, run_id: int, step: int) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM snapshots WHERE run_id = ? AND step = ?", (run_id, int(step))
            ).fetchone()
            return row is not None

    def write_snapshot(self, run_id: int, snapshot: Any, state: Mapping[str, Any] | None = None) -> bool:
        """Write one snapshot (and the monitor ``state``, if given) in one transaction.
        Returns False, writing nothing, when this run already has that step. ValueError (writing nothing) for a
        step SQLite cannot hold."""
        step = check_step(snapshot.step)
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
        with self._transaction():
            if self._conn.execute(
                "SELECT 1 FROM snapshots WHERE run_id = ? AND step = ?", (run_id, step)
            ).fetchone():
                return False
            placeholders = ", ".join("?" for _ in FIT_COLUMNS)
            columns = ", ".join(FIT_COLUMNS)
            self._conn.executemany(f"INSERT INTO fits ({columns}) VALUES ({placeholders})", fit_rows)
            self._conn.executemany(
                "INSERT INTO aggregates (run_id, step, metric, value) VALUES (?, ?, ?, ?)", aggregate_rows
            )
            self._conn.executemany(
                'INSERT INTO alerts (run_id, step, rule, level, key, matrices, "values", message) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                alert_rows,
            )
            if state is not None:
                self._save_state(run_id, step, state)
            # the snapshot row goes last: a reader that sees it sees everything it refers to
            self._conn.execute(
                "INSERT INTO snapshots (run_id, step, wall_time, duration_s, n_matrices, n_skipped, T_over_tau, "
                "attention_kind, expectation, skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
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
                ),
            )
        return True

    def _save_state(self, run_id: int, step: int | None, state: Mapping[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO state (run_id, step, state) VALUES (?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET step = excluded.step, state = excluded.state",
            (run_id, step, json.dumps(state, allow_nan=True)),
        )

    def save_state(self, run_id: int, state: Mapping[str, Any], step: int | None = None) -> None:
        """Store the monitor's resumable state (JSON) for a run, replacing the previous one."""
        with self._transaction():
            self._save_state(run_id, step, state)

    def load_state(self, run_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT state FROM state WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    # ---------------------------------------------------------------------------------------------- readers

    def _select(self, table: str, where: dict[str, Any], order: str) -> list[dict[str, Any]]:
        clauses = [f'"{column}" = ?' for column, value in where.items() if value is not None]
        params = [value for value in where.values() if value is not None]
        sql = (
            f"SELECT * FROM {table}"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY {order}"
        )
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

    def runs(self) -> list[dict[str, Any]]:
        return self._select("runs", {}, "run_id")

    def run_id(self, name: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT run_id FROM runs WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def snapshots(self, run_id: int | None = None) -> list[dict[str, Any]]:
        return self._select("snapshots", {"run_id": run_id}, "run_id, step")

    def steps(self, run_id: int | None = None) -> list[int]:
        return [row["step"] for row in self.snapshots(run_id)]

    def fits(self, step: int | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
        return self._select("fits", {"run_id": run_id, "step": step}, "run_id, step, name")

    def aggregates(self, run_id: int | None = None, step: int | None = None) -> list[dict[str, Any]]:
        return self._select("aggregates", {"run_id": run_id, "step": step}, "run_id, step, metric")

    def alerts(self, run_id: int | None = None) -> list[dict[str, Any]]:
        return self._select("alerts", {"run_id": run_id}, "run_id, step, alert_id")

    def to_pandas(self, table: str) -> Any:
        """One table as a pandas DataFrame (needs pandas: ``pip install weibull-monitor[all]``)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {TABLES}")
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("to_pandas needs pandas: pip install pandas") from error
        readers = {
            "runs": self.runs,
            "snapshots": self.snapshots,
            "fits": self.fits,
            "aggregates": self.aggregates,
            "alerts": self.alerts,
            "state": lambda: self._select("state", {}, "run_id"),
        }
        return pd.DataFrame(readers[table]())

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

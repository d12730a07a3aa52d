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
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("weibull_monitor.store")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    package_version TEXT,
    model_summary TEXT,
    optimizer TEXT,
    attention_kind TEXT,
    expectation TEXT,
    meta TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    wall_time REAL,
    duration_s REAL,
    n_matrices INTEGER,
    n_skipped INTEGER,
    T_over_tau REAL,
    attention_kind TEXT,
    expectation TEXT,
    skipped TEXT,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS fits (
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL,
    param_name TEXT, layer INTEGER, component TEXT, klass TEXT, expert INTEGER, stack TEXT, fused_parent TEXT,
    metric_key TEXT, in_aggregates INTEGER,
    k REAL, k_stderr REAL, scale REAL, scale_rel_stderr REAL, r2 REAL,
    n INTEGER, n_zero INTEGER, n_nonfinite INTEGER, method TEXT, ok INTEGER, reason TEXT,
    q10 REAL, q50 REAL, q90 REAL, q99 REAL, q999 REAL,
    drift REAL, drift_z REAL, scale_growth REAL,
    lr REAL, lr_peak REAL, weight_decay REAL, T_over_tau REAL,
    scale_over_sqrt_lr_wd REAL, scale_over_sqrt_peak_lr_wd REAL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS aggregates (
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, step, metric)
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, rule TEXT NOT NULL, level TEXT NOT NULL, key TEXT,
    matrices TEXT, "values" TEXT, message TEXT
);
CREATE TABLE IF NOT EXISTS state (
    run_id INTEGER PRIMARY KEY, step INTEGER, state TEXT
);
CREATE INDEX IF NOT EXISTS fits_by_step ON fits (run_id, step);
CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run_id, step);
"""

TABLES = ("runs", "snapshots", "fits", "aggregates", "alerts", "state")
_JSON_COLUMNS = {
    "runs": ("model_summary", "optimizer", "meta"),
    "snapshots": ("skipped",),
    "alerts": ("matrices", "values"),
}
_FIT_FIELDS = (
    "k", "k_stderr", "scale", "scale_rel_stderr", "r2", "n", "n_zero", "n_nonfinite", "method", "ok", "reason",
    "q10", "q50", "q90", "q99", "q999",
)  # fmt: skip
_STAT_FIELDS = (
    "metric_key", "in_aggregates", "drift", "drift_z", "scale_growth", "lr", "lr_peak", "weight_decay",
    "T_over_tau", "scale_over_sqrt_lr_wd", "scale_over_sqrt_peak_lr_wd",
)  # fmt: skip
_ROLE_FIELDS = ("layer", "component", "klass", "expert", "stack", "fused_parent")
_FIT_COLUMNS = (
    "run_id",
    "step",
    "name",
    "param_name",
    *_ROLE_FIELDS,
    *_STAT_FIELDS[:2],
    *_FIT_FIELDS,
    *_STAT_FIELDS[2:],
)


class StoreError(RuntimeError):
    """The store file cannot be used (e.g. written by a newer version of weibull-monitor)."""


def _clean(value: Any) -> Any:
    """A value SQLite can hold: non-finite floats become NULL, bools ints, tensors/numpy scalars Python."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json(value: Any) -> str:
    """JSON without NaN/inf (they become null), so any reader can parse it."""

    def scrub(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): scrub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [scrub(v) for v in x]
        return x

    return json.dumps(scrub(value), default=str, allow_nan=False)


class RunStore:
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
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
            from weibull_monitor import __version__

            cursor = self._conn.execute(
                "INSERT INTO runs (name, created, package_version, model_summary, optimizer, attention_kind, "
                "expectation, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    time.time(),
                    str(meta.pop("package_version", __version__)),
                    _json(meta.pop("model_summary", None)),
                    _json(meta.pop("optimizer", None)),
                    meta.pop("attention_kind", None),
                    meta.pop("expectation", None),
                    _json(meta),
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
        Returns False, writing nothing, when this run already has that step."""
        step = int(snapshot.step)
        fit_rows = []
        stats = getattr(snapshot, "matrices", {}) or {}
        for key, fit in snapshot.fits.items():
            role = snapshot.roles.get(key)
            s = stats.get(key)
            row: dict[str, Any] = {"run_id": run_id, "step": step, "name": key}
            row["param_name"] = getattr(role, "fused_parent", None) or key
            for f in _ROLE_FIELDS:
                row[f] = getattr(role, f, None)
            for f in _FIT_FIELDS:
                row[f] = getattr(fit, f, None)
            for f in _STAT_FIELDS:
                row[f] = getattr(s, f, None)
            fit_rows.append(tuple(_clean(row[c]) for c in _FIT_COLUMNS))
        aggregate_rows = [
            (run_id, step, metric, _clean(value)) for metric, value in snapshot.aggregates.items()
        ]
        alert_rows = [
            (run_id, int(a.step), a.rule, a.level, a.key, _json(list(a.matrices)), _json(a.values), a.message)
            for a in snapshot.alerts
        ]
        skipped = dict(getattr(snapshot, "skipped", {}) or {})
        with self._transaction():
            if self._conn.execute(
                "SELECT 1 FROM snapshots WHERE run_id = ? AND step = ?", (run_id, step)
            ).fetchone():
                return False
            placeholders = ", ".join("?" for _ in _FIT_COLUMNS)
            columns = ", ".join(_FIT_COLUMNS)
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
                    _clean(getattr(snapshot, "wall_time", None)),
                    _clean(getattr(snapshot, "duration_s", None)),
                    len(snapshot.fits),
                    len(skipped),
                    _clean(snapshot.T_over_tau),
                    getattr(snapshot, "attention_kind", None),
                    getattr(snapshot, "expectation", None),
                    _json(skipped),
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
        json_columns = _JSON_COLUMNS.get(table, ())
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


# Errors that say "this snapshot cannot be stored" rather than "the file cannot be written now".
_DATA_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError, TypeError, ValueError)


class StoreWriter:
    """Keeps a store error from stopping training: the snapshot that could not be written is kept in memory (up
    to ``backlog`` snapshots, oldest dropped first) and retried at the next write; the fault is logged once with
    its cause, and the recovery once when it clears.

    ``target()`` returns ``(store, run_id)``; it may open the file and the run itself, so a store that cannot
    even be opened yet is retried the same way.
    """

    def __init__(self, target: Callable[[], tuple[RunStore, int]], *, backlog: int = 1000) -> None:
        self.target = target
        self.pending: deque[tuple[Any, Mapping[str, Any] | None]] = deque(maxlen=backlog)
        self.failed_writes = 0
        self.written = 0
        self.duplicates = 0
        self.rejected = 0
        self._faulty = False

    def write(self, snapshot: Any, state: Mapping[str, Any] | None = None) -> bool:
        """Queue ``snapshot`` (with the monitor ``state`` to save beside it) and write everything pending.
        True when nothing is left pending."""
        if len(self.pending) == self.pending.maxlen:
            logger.warning(
                "store backlog full: dropping the unwritten snapshot of step %s", self.pending[0][0].step
            )
        self.pending.append((snapshot, state))
        return self.retry()

    def retry(self) -> bool:
        """Write what is pending, oldest first. A snapshot the store rejects as data (not as a fault of the file)
        is dropped with a logged reason, so it cannot block the ones after it. True when nothing is pending."""
        if not self.pending:
            return True
        try:
            store, run_id = self.target()
            while self.pending:
                snapshot, state = self.pending[0]
                try:
                    stored = store.write_snapshot(run_id, snapshot, state)
                except _DATA_ERRORS as error:
                    self.pending.popleft()
                    self.rejected += 1
                    logger.warning(
                        "store rejected the snapshot of step %s (%s: %s); it is dropped",
                        getattr(snapshot, "step", "?"),
                        type(error).__name__,
                        error,
                    )
                    continue
                self.pending.popleft()
                if stored:
                    self.written += 1
                else:
                    self.duplicates += 1
        except Exception as error:  # locked, disk full, unwritable folder, newer schema: never stop training
            self.failed_writes += 1
            if not self._faulty:
                self._faulty = True
                logger.warning(
                    "store write failed (%s: %s); training continues, %d snapshot(s) kept in memory and "
                    "retried at the next snapshot",
                    type(error).__name__,
                    error,
                    len(self.pending),
                )
            return False
        if self._faulty:
            self._faulty = False
            logger.warning("store writes work again; the kept snapshots are written")
        return True

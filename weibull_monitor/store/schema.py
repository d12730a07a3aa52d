"""The run store's SQLite schema. The per-matrix columns of ``fits`` are derived from the records they hold (the
fit, the role, the per-matrix dynamics), so a field added to a record becomes a column, and an older store gains
it when it is next opened for writing (``ALTER TABLE ADD COLUMN``, NULL for the rows written before).
"""

from __future__ import annotations

import sqlite3
from dataclasses import fields

from weibull_monitor.estimator import WeibullFit
from weibull_monitor.models import Role
from weibull_monitor.snapshot.dynamics import MatrixStats

__all__ = [
    "FIT_COLUMNS",
    "FIT_FIELDS",
    "JSON_COLUMNS",
    "ROLE_FIELDS",
    "SCHEMA_VERSION",
    "STAT_FIELDS",
    "TABLES",
    "create_schema",
]

SCHEMA_VERSION = 1

TABLES = ("runs", "snapshots", "fits", "aggregates", "alerts", "state")
JSON_COLUMNS = {
    "runs": ("model_summary", "optimizer", "meta"),
    "snapshots": ("skipped",),
    "alerts": ("matrices", "values"),
}

#: Role fields stored per matrix (``parts`` and ``stacked`` describe the parameter, not the stored matrix).
ROLE_FIELDS = ("layer", "component", "klass", "expert", "stack", "fused_parent")
FIT_FIELDS = tuple(f.name for f in fields(WeibullFit))
STAT_FIELDS = tuple(f.name for f in fields(MatrixStats))
#: Columns of ``fits``, in table order: keys, role, the two stat fields that say where a matrix counts, the fit,
#: then the rest of the dynamics (the order of schema version 1).
FIT_COLUMNS = (
    "run_id",
    "step",
    "name",
    "param_name",
    *ROLE_FIELDS,
    *STAT_FIELDS[:2],
    *FIT_FIELDS,
    *STAT_FIELDS[2:],
)

_SQL_TYPES = {"float": "REAL", "int": "INTEGER", "bool": "INTEGER", "str": "TEXT"}
_KEY_TYPES = {
    "run_id": "INTEGER NOT NULL",
    "step": "INTEGER NOT NULL",
    "name": "TEXT NOT NULL",
    "param_name": "TEXT",
}


def _sql_type(annotation: str) -> str:
    """SQLite type of a dataclass field annotation such as ``"float"`` or ``"int | None"``."""
    base = annotation.replace(" ", "").replace("|None", "").replace("None|", "")
    return _SQL_TYPES.get(base, "TEXT")


def _column_types() -> dict[str, str]:
    declared = {f.name: f.type for record in (WeibullFit, Role, MatrixStats) for f in fields(record)}
    return {column: _KEY_TYPES.get(column) or _sql_type(str(declared[column])) for column in FIT_COLUMNS}


_STATIC = """
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
"""


def _statements() -> list[str]:
    columns = ",\n    ".join(f"{name} {kind}" for name, kind in _column_types().items())
    fits_table = f"CREATE TABLE IF NOT EXISTS fits (\n    {columns},\n    PRIMARY KEY (run_id, step, name)\n)"
    statements = [s.strip() for s in _STATIC.split(";") if s.strip()]
    return [
        *statements,
        fits_table,
        "CREATE INDEX IF NOT EXISTS fits_by_step ON fits (run_id, step)",
        "CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run_id, step)",
    ]


def create_schema(conn: sqlite3.Connection) -> None:
    """Create every table that is missing, and add the ``fits`` columns an older store lacks (inside the caller's
    transaction)."""
    for statement in _statements():
        conn.execute(statement)
    present = {row[1] for row in conn.execute("PRAGMA table_info(fits)")}
    for column, kind in _column_types().items():
        if column not in present:
            conn.execute(f"ALTER TABLE fits ADD COLUMN {column} {kind.replace(' NOT NULL', '')}")

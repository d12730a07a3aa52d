"""The run store's SQLite schema. The per-matrix columns of ``fits`` are derived from the records they hold (the
fit, the role, the per-matrix dynamics), so a field added to a record becomes a column, and an older store gains
it when it is next opened for writing (``ALTER TABLE ADD COLUMN``, NULL for the rows written before).

Version 2 (branches): a run is a tree of branches. Every writer of a run (a training process, or one after each
rewind) writes its own branch; a rewind to step s moves the live rows after s of ``snapshots``, ``fits``,
``aggregates`` and ``alerts`` into their ``*_superseded`` twins (same columns plus ``superseded_by``,
``superseded_at``, ``rewind_step``), so the live tables always hold exactly one timeline. ``branches`` says who
wrote what and where each branch forked; ``snapshot_states`` keeps the monitor state written with every snapshot
(what a rewind restores). A version-1 store is migrated in place when it is opened for writing (:func:`migrate`):
its rows become branch 0 of their run.
"""

from __future__ import annotations

import sqlite3
from dataclasses import fields

from weibull_monitor.estimator import WeibullFit
from weibull_monitor.models import Role
from weibull_monitor.snapshot.dynamics import MatrixStats

__all__ = [
    "BRANCH_COLUMNS",
    "FIT_COLUMNS",
    "FIT_FIELDS",
    "JSON_COLUMNS",
    "ROLE_FIELDS",
    "SCHEMA_VERSION",
    "SERIES_TABLES",
    "STAT_FIELDS",
    "SUPERSEDED",
    "SUPERSEDED_COLUMNS",
    "TABLES",
    "create_schema",
    "migrate",
    "table_columns",
]

SCHEMA_VERSION = 2

#: The tables that hold a run's timeline; each has a ``*_superseded`` twin for the rows a rewind replaced.
SERIES_TABLES = ("snapshots", "fits", "aggregates", "alerts")
SUPERSEDED = {table: f"{table}_superseded" for table in SERIES_TABLES}
#: What a superseded row carries besides its live columns: the branch that replaced it, when, and the rewind step.
SUPERSEDED_COLUMNS = ("superseded_by", "superseded_at", "rewind_step")
TABLES = (
    "runs",
    "branches",
    *SERIES_TABLES,
    "state",
    "snapshot_states",
    *SUPERSEDED.values(),
)
JSON_COLUMNS = {
    "runs": ("model_summary", "optimizer", "meta"),
    "branches": ("dashboards",),
    "snapshots": ("skipped",),
    "alerts": ("matrices", "values"),
}
for _table, _twin in SUPERSEDED.items():
    if _table in JSON_COLUMNS:
        JSON_COLUMNS[_twin] = JSON_COLUMNS[_table]
#: Columns of ``branches`` (one row per writer of a run, or per rewind).
BRANCH_COLUMNS = (
    "run_id",
    "branch",
    "parent",
    "fork_step",
    "created",
    "reason",
    "writer",
    "pid",
    "host",
    "last_write",
    "n_superseded",
    "superseded_first",
    "superseded_last",
    "dashboards",
    "message",
)

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


# The column lists of the series tables (without ``branch``, which version 2 appends), shared with their
# ``*_superseded`` twins.
_SNAPSHOT_COLUMNS = """
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    wall_time REAL,
    duration_s REAL,
    n_matrices INTEGER,
    n_skipped INTEGER,
    T_over_tau REAL,
    attention_kind TEXT,
    expectation TEXT,
    skipped TEXT"""
_AGGREGATE_COLUMNS = "run_id INTEGER NOT NULL, step INTEGER NOT NULL, metric TEXT NOT NULL, value REAL"
_ALERT_COLUMNS = """
    run_id INTEGER NOT NULL, step INTEGER NOT NULL, rule TEXT NOT NULL, level TEXT NOT NULL, key TEXT,
    matrices TEXT, "values" TEXT, message TEXT"""
_BRANCH = "branch INTEGER NOT NULL DEFAULT 0"
_MARKS = "superseded_by INTEGER, superseded_at REAL, rewind_step INTEGER"

_STATIC = f"""
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
    meta TEXT,
    live_branch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS branches (
    run_id INTEGER NOT NULL, branch INTEGER NOT NULL, parent INTEGER, fork_step INTEGER, created REAL NOT NULL,
    reason TEXT, writer TEXT, pid INTEGER, host TEXT, last_write REAL,
    n_superseded INTEGER NOT NULL DEFAULT 0, superseded_first INTEGER, superseded_last INTEGER,
    dashboards TEXT, message TEXT,
    PRIMARY KEY (run_id, branch)
);
CREATE TABLE IF NOT EXISTS snapshots ({_SNAPSHOT_COLUMNS}, {_BRANCH}, PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS aggregates ({_AGGREGATE_COLUMNS}, {_BRANCH}, PRIMARY KEY (run_id, step, metric));
CREATE TABLE IF NOT EXISTS alerts (alert_id INTEGER PRIMARY KEY AUTOINCREMENT, {_ALERT_COLUMNS}, {_BRANCH});
CREATE TABLE IF NOT EXISTS state (run_id INTEGER PRIMARY KEY, step INTEGER, state TEXT);
CREATE TABLE IF NOT EXISTS snapshot_states (
    run_id INTEGER NOT NULL, branch INTEGER NOT NULL, step INTEGER NOT NULL, state TEXT,
    PRIMARY KEY (run_id, branch, step)
);
CREATE TABLE IF NOT EXISTS snapshots_superseded (
    {_SNAPSHOT_COLUMNS}, {_BRANCH}, {_MARKS}, PRIMARY KEY (run_id, branch, step)
);
CREATE TABLE IF NOT EXISTS aggregates_superseded (
    {_AGGREGATE_COLUMNS}, {_BRANCH}, {_MARKS}, PRIMARY KEY (run_id, branch, step, metric)
);
CREATE TABLE IF NOT EXISTS alerts_superseded (alert_id INTEGER PRIMARY KEY, {_ALERT_COLUMNS}, {_BRANCH}, {_MARKS})
"""


def _statements() -> list[str]:
    columns = ",\n    ".join(f"{name} {kind}" for name, kind in _column_types().items())
    fits_table = f"CREATE TABLE IF NOT EXISTS fits (\n    {columns},\n    {_BRANCH},\n    PRIMARY KEY (run_id, step, name)\n)"
    fits_twin = (
        f"CREATE TABLE IF NOT EXISTS fits_superseded (\n    {columns},\n    {_BRANCH}, {_MARKS},\n"
        "    PRIMARY KEY (run_id, branch, step, name)\n)"
    )
    statements = [s.strip() for s in _STATIC.split(";") if s.strip()]
    return [
        *statements,
        fits_table,
        fits_twin,
        "CREATE INDEX IF NOT EXISTS fits_by_step ON fits (run_id, step)",
        "CREATE INDEX IF NOT EXISTS alerts_by_run ON alerts (run_id, step)",
        "CREATE INDEX IF NOT EXISTS fits_superseded_by_step ON fits_superseded (run_id, branch, step)",
        "CREATE INDEX IF NOT EXISTS alerts_superseded_by_run ON alerts_superseded (run_id, branch, step)",
    ]


def table_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    """The columns of ``table`` in table order (empty when it does not exist)."""
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _add_missing(conn: sqlite3.Connection, table: str, wanted: dict[str, str]) -> None:
    present = set(table_columns(conn, table))
    for column, kind in wanted.items():
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind.replace(' NOT NULL', '')}")


def create_schema(conn: sqlite3.Connection) -> None:
    """Create every table that is missing, and add the ``fits`` columns an older store lacks to ``fits`` and its
    superseded twin (inside the caller's transaction)."""
    for statement in _statements():
        conn.execute(statement)
    for table in ("fits", SUPERSEDED["fits"]):
        _add_missing(conn, table, _column_types())


def migrate(conn: sqlite3.Connection, version: int | None) -> None:
    """Bring a store of schema ``version`` (None: a new file) to :data:`SCHEMA_VERSION`, inside the caller's
    transaction. Version 1 -> 2: the series tables and ``runs`` gain their branch columns (every existing row is
    branch 0 of its run, live), each run gets its branch-0 row, and the one saved state per run becomes the state of
    its snapshot. Nothing is rewritten or dropped."""
    if version == 1:
        for table in (*SERIES_TABLES, "runs"):
            if not table_columns(conn, table):
                continue  # a table the version-1 store never created: create_schema makes it whole
            column = "live_branch" if table == "runs" else "branch"
            if column not in table_columns(conn, table):
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    create_schema(conn)
    if version == 1:
        conn.execute(
            "INSERT OR IGNORE INTO branches (run_id, branch, parent, fork_step, created, reason) "
            "SELECT run_id, 0, NULL, NULL, created, 'migrated from store schema 1' FROM runs"
        )
        conn.execute(
            "INSERT OR IGNORE INTO snapshot_states (run_id, branch, step, state) "
            "SELECT state.run_id, 0, state.step, state.state FROM state JOIN snapshots "
            "ON snapshots.run_id = state.run_id AND snapshots.step = state.step"
        )

"""How a store file is opened: readers read-only (nothing created, nothing switched), writers only into a file that
is empty or already a run store, and every SQLite failure worded as a :class:`StoreError` naming the file.

A reader (``report``, notebooks) must leave the file exactly as it found it: no tables, no WAL switch, no schema
row. A writer must not add tables to another application's database that happens to be passed as the store.
"""

from __future__ import annotations

import operator
import sqlite3
import urllib.parse
from pathlib import Path

__all__ = [
    "MAX_STEP",
    "MIN_STEP",
    "StoreError",
    "check_step",
    "check_writable",
    "open_read_only",
    "stored_version",
]

#: Steps an SQLite INTEGER holds.
MIN_STEP = -(1 << 63)
MAX_STEP = (1 << 63) - 1


class StoreError(RuntimeError):
    """The store file cannot be used (not a run store, another application's database, written by a newer
    version of weibull-monitor, unreadable)."""


def check_step(step: object) -> int:
    """``step`` as an int an SQLite INTEGER holds; ValueError (a data error: that snapshot is dropped, the store
    stays writable) for anything else."""
    if isinstance(step, bool):
        raise ValueError(f"step {step!r} is not a whole number")
    try:
        step = operator.index(step)  # int, numpy integers
    except TypeError:
        if not (isinstance(step, float) and step.is_integer()):
            raise ValueError(f"step {step!r} is not a whole number") from None
        step = int(step)
    if not MIN_STEP <= step <= MAX_STEP:
        raise ValueError(f"step {step} is beyond what the store can hold (|step| < 2**63)")
    return step


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def stored_version(conn: sqlite3.Connection, path: object) -> int | None:
    """The schema version a store records (None: no ``schema_version`` table or no row); StoreError for a value
    that is no version number."""
    if "schema_version" not in _tables(conn):
        return None
    value = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"{path}: not a weibull-monitor run store (schema_version holds {value!r})")
    return value


def check_writable(conn: sqlite3.Connection, path: object) -> None:
    """StoreError unless the file is empty or a run store: tables of another application are never joined by ours
    (nor is its journal mode switched)."""
    tables = _tables(conn)
    if tables and "schema_version" not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(
            f"{path}: an SQLite database of another application (tables: {shown}), not a weibull-monitor run "
            "store; refusing to add tables to it (choose a new file for --store)"
        )
    stored_version(conn, path)


def _wal_without_its_files(path: Path) -> bool:
    """A database in WAL mode (header bytes 18-19) whose -wal and -shm files are absent: no writer has it open, and
    an ordinary read-only connection would create both beside it."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(20)
    except OSError:
        return False
    wal = len(header) == 20 and header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"
    return wal and not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()


def open_read_only(path: Path, timeout: float, newest: int) -> sqlite3.Connection:
    """A read-only connection to an existing run store: the file is opened ``mode=ro`` and nothing is created in it
    or beside it. A store in WAL mode that no writer holds open (no -wal or -shm file) is opened as immutable, so
    that not even those files appear; one a run is writing is read through them, as SQLite readers do. StoreError
    when the file is missing, no SQLite database, no run store, or a run store of a schema version newer than
    ``newest``."""
    if not path.exists():
        raise StoreError(f"{path}: no such run store")
    if not path.is_file():
        raise StoreError(f"{path}: not a file, so not a run store")
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    attempts = ("&immutable=1",) if _wal_without_its_files(path) else ("", "&immutable=1")
    conn = None
    try:
        for i, suffix in enumerate(attempts):
            conn = sqlite3.connect(
                uri + suffix, uri=True, timeout=timeout, check_same_thread=False, isolation_level=None
            )
            try:
                tables = _tables(conn)
                break
            except sqlite3.OperationalError:  # a WAL store in a read-only folder, with no -shm: immutable
                conn.close()
                conn = None
                if i == len(attempts) - 1:
                    raise
        assert conn is not None
        if "schema_version" not in tables or "runs" not in tables:
            raise StoreError(f"{path}: not a weibull-monitor run store (no schema_version or runs table)")
        version = stored_version(conn, path)
        if version is not None and version > newest:
            raise StoreError(
                f"{path} has store schema version {version}; this weibull-monitor reads up to {newest}: "
                "upgrade weibull-monitor"
            )
        return conn
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise StoreError(f"{path}: cannot be read as a run store ({exc})") from None
    except StoreError:
        if conn is not None:
            conn.close()
        raise

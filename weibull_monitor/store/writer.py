"""StoreWriter: a store that cannot be written right now never stops training; snapshots wait in memory."""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from weibull_monitor.store.run_store import RunStore

__all__ = ["StoreWriter"]

logger = logging.getLogger("weibull_monitor.store")


# Errors that say "this snapshot cannot be stored" rather than "the file cannot be written now".
_DATA_ERRORS = (
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    TypeError,
    ValueError,
    OverflowError,  # a number SQLite cannot hold (a step of 10**19): that snapshot only, never the ones after it
)


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

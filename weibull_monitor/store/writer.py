"""StoreWriter: a store that cannot be written right now never stops training; snapshots wait in memory.

It also keeps the writer's branch: the first write of a writer (or a resume/rewind, :meth:`StoreWriter.fork`)
starts its branch of the run, and every later snapshot goes to that branch, in the order they were asked for.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weibull_monitor.store.run_store import RunStore, WriteResult

__all__ = ["StoreWriter"]

logger = logging.getLogger("weibull_monitor.store")


# Errors that say "this snapshot cannot be stored" rather than "the file cannot be written now".
_DATA_ERRORS = (sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError, TypeError, ValueError)


@dataclass
class _Fork:
    """A pending start of a new branch at ``step``."""

    step: int
    reason: str
    state: Mapping[str, Any] | None = None
    message: str | None = None
    implicit: bool = False  # made by the writer itself before its first snapshot


@dataclass
class _Write:
    snapshot: Any
    state: Mapping[str, Any] | None = None
    step: int = field(init=False)

    def __post_init__(self) -> None:
        self.step = int(getattr(self.snapshot, "step", -1))


class StoreWriter:
    """Keeps a store error from stopping training: the snapshot that could not be written is kept in memory (up
    to ``backlog`` snapshots, oldest dropped first) and retried at the next write; the fault is logged once with
    its cause, and the recovery once when it clears.

    ``target()`` returns ``(store, run_id)``; it may open the file and the run itself, so a store that cannot
    even be opened yet is retried the same way. ``identity`` (``writer`` uuid, ``pid``, ``host``) and
    ``dashboards()`` (where the sinks write) describe this writer's branch. ``on_fork(result)`` is called when a
    fork is done; ``on_superseded(store, run_id, step)`` when a snapshot went to the superseded tables because
    another writer took the run over.
    """

    def __init__(
        self,
        target: Callable[[], tuple[RunStore, int]],
        *,
        backlog: int = 1000,
        identity: Mapping[str, Any] | None = None,
        dashboards: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
        on_fork: Callable[[dict[str, Any]], None] | None = None,
        on_superseded: Callable[[RunStore, int, int], None] | None = None,
    ) -> None:
        self.target = target
        self.backlog = int(backlog)
        self.pending: deque[_Fork | _Write] = deque()
        self.identity = dict(identity or {})
        self.dashboards = dashboards
        self.on_fork = on_fork
        self.on_superseded = on_superseded
        self.branch: int | None = None
        self.failed_writes = 0
        self.written = 0
        self.duplicates = 0
        self.rejected = 0
        self.superseded = 0
        self._faulty = False
        self._written_dashboards: list[Any] | None = None
        self._results: dict[int, dict[str, Any]] = {}

    def fork(
        self,
        step: int,
        *,
        reason: str,
        state: Mapping[str, Any] | None = None,
        message: str | None = None,
    ) -> dict[str, Any] | None:
        """Start this writer's new branch at ``step`` (a resume or rewind), after what is already pending.
        Returns the store's answer when it could be written now, else None (it stays pending, in order)."""
        item = _Fork(int(step), reason, None if state is None else dict(state), message)
        self.pending.append(item)
        self.retry()
        return self._results.pop(id(item), None)

    def write(self, snapshot: Any, state: Mapping[str, Any] | None = None) -> bool:
        """Queue ``snapshot`` (with the monitor ``state`` to save beside it) and write everything pending.
        True when nothing is left pending."""
        if self.branch is None and not any(isinstance(item, _Fork) for item in self.pending):
            # this writer's first snapshot starts its branch: anything live from this step on is another
            # writer's (a concurrent one, or an abandoned timeline) and is superseded
            step = int(snapshot.step)
            self.pending.append(_Fork(step - 1, "start", implicit=True))
        writes = [item for item in self.pending if isinstance(item, _Write)]
        if len(writes) >= self.backlog:
            logger.warning("store backlog full: dropping the unwritten snapshot of step %s", writes[0].step)
            self.pending.remove(writes[0])
        self.pending.append(_Write(snapshot, state))
        return self.retry()

    def _current_dashboards(self) -> list[Any] | None:
        if self.dashboards is None:
            return None
        try:
            current = [dict(d) for d in self.dashboards()]
        except Exception:  # where the dashboards are is a nicety: never a reason not to store
            return None
        return None if current == self._written_dashboards else current

    @staticmethod
    def _notify(callback: Callable[..., Any] | None, *args: Any) -> None:
        """Tell the owner; its failure is logged, never taken for a store fault."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            logger.exception("store writer: notifying the monitor failed")

    def retry(self) -> bool:
        """Write what is pending, oldest first. A snapshot the store rejects as data (not as a fault of the file)
        is dropped with a logged reason, so it cannot block the ones after it. True when nothing is pending."""
        if not self.pending:
            return True
        try:
            store, run_id = self.target()
            while self.pending:
                item = self.pending[0]
                if isinstance(item, _Fork):
                    self._written_dashboards = None  # a new branch records where its sinks write afresh
                    dashboards = self._current_dashboards()
                    result = store.fork(
                        run_id,
                        item.step,
                        writer=self.identity,
                        reason=item.reason,
                        message=item.message,
                        dashboards=dashboards,
                        state=item.state,
                    )
                    self.pending.popleft()
                    if dashboards is not None:
                        self._written_dashboards = dashboards
                    self.branch = int(result["branch"])
                    result["implicit"] = item.implicit
                    if not item.implicit:
                        self._results[id(item)] = result
                    self._notify(self.on_fork, result)
                    continue
                dashboards = self._current_dashboards()
                try:
                    stored = store.write_snapshot(
                        run_id, item.snapshot, item.state, branch=self.branch, dashboards=dashboards
                    )
                except _DATA_ERRORS as error:
                    self.pending.popleft()
                    self.rejected += 1
                    logger.warning(
                        "store rejected the snapshot of step %s (%s: %s); it is dropped",
                        item.step,
                        type(error).__name__,
                        error,
                    )
                    continue
                self.pending.popleft()
                if dashboards is not None:
                    self._written_dashboards = dashboards
                if stored == WriteResult.SUPERSEDED:
                    self.superseded += 1
                    self._notify(self.on_superseded, store, run_id, item.step)
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
                    sum(isinstance(item, _Write) for item in self.pending),
                )
            return False
        if self._faulty:
            self._faulty = False
            logger.warning("store writes work again; the kept snapshots are written")
        return True

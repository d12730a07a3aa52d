"""The one interface every dashboard implements (W&B, TensorBoard, Lightning loggers, logging, ...).

A sink only receives data; it never decides anything. The monitor wraps every sink in
:class:`weibull_monitor.sinks.guard.GuardedSink`, so a sink that raises or hangs is reported once and never
stops training: sink authors do not need their own try/except around every call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for type hints only: keeps ``import weibull_monitor.sinks`` free of torch
    from weibull_monitor.alerts import Alert
    from weibull_monitor.snapshot import Snapshot


class Sink:
    """Base class of every sink. Every method is optional: the defaults do nothing.

    Class attribute ``run_in_thread`` (default True): the guard calls the sink on a worker thread so a slow
    dashboard costs training nothing. A sink whose library must be called from the training thread sets it
    to False; it is then called inline (exceptions are still caught, but a hang cannot be bounded).
    """

    run_in_thread: bool = True

    @property
    def name(self) -> str:
        """Short name used in the one-line fault reports of the guard (the class name unless set)."""
        return self.__dict__.get("_sink_name") or type(self).__name__

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_sink_name"] = str(value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalar metrics of one snapshot (keys ``weibull/...``, finite floats; missing values are absent)."""

    def log_alert(self, alert: Alert) -> None:
        """One fired alert."""

    def log_snapshot(self, snapshot: Snapshot) -> None:
        """Optional rich content for a whole snapshot (tables, images). Called after ``log_metrics``."""

    def flush(self) -> None:
        """Push buffered data out (optional)."""

    def close(self) -> None:
        """Release files, runs and handles. Called once by ``WeibullMonitor.close``."""

    def location(self) -> list[dict[str, Any]]:
        """Where this sink writes (``{"kind": ..., "id": ..., ...}`` per destination), recorded with the run's
        branch in the store so that a later rewind can find the points the abandoned timeline left there."""
        return []

    def rewind(self, step: int, superseded: Sequence[Mapping[str, Any]] = ()) -> None:
        """The run went back to ``step``: what it sent after ``step`` belongs to an abandoned timeline, and the
        resumed timeline's snapshots from ``step + 1`` come next. ``superseded`` lists the abandoned branches
        (``first_step``, ``last_step``, ``pid``, ``host``, ``this_process``, ``dashboards``: their locations).
        The default does nothing (a log line or a list takes the resumed points as they come)."""


logger = logging.getLogger("weibull_monitor.sinks")


def same_place(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two :meth:`Sink.location` entries name the same destination."""
    return a.get("kind") == b.get("kind") and a.get("id") is not None and a.get("id") == b.get("id")


class StepHold:
    """For a destination that cannot take points back (a W&B run, an MLflow run, a CSV file): after a rewind to s,
    the resumed steps up to the last step the abandoned timeline sent *to the same destination* are held back
    (not sent), so no step appears twice in a series there; the store keeps them. Tracks the last step sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: int | None = None  # the last step sent to the current destination
        self.through: int | None = None  # steps up to this one are held back

    def note(self, step: int) -> None:
        step = int(step)
        self.sent = step if self.sent is None else max(self.sent, step)

    def held(self, step: int) -> bool:
        return self.through is not None and int(step) <= self.through

    def rewind(
        self, step: int, superseded: Sequence[Mapping[str, Any]], here: Sequence[Mapping[str, Any]]
    ) -> int | None:
        """Decide what to hold back after a rewind to ``step``; returns the last held step (None: nothing)."""
        last = self.sent if self.sent is not None and self.sent > step else None  # sent by this process
        for entry in superseded:
            places = entry.get("dashboards") or ()
            theirs = entry.get("last_step")
            if (
                theirs is not None
                and int(theirs) > step
                and any(same_place(p, h) for p in places for h in here)
            ):
                last = max(last or step, int(theirs))
        if last is None:
            return None
        self.through = last if self.through is None else max(self.through, last)
        logger.warning(
            "%s: the destination already holds steps %d-%d of the abandoned timeline and cannot take points back; "
            "the resumed timeline's steps up to %d are not sent there (the run store has them)",
            self.name,
            step + 1,
            last,
            last,
        )
        return last

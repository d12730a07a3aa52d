"""The one interface every dashboard implements (W&B, TensorBoard, Lightning loggers, logging, ...).

A sink only receives data; it never decides anything. The monitor wraps every sink in
:class:`weibull_monitor.sinks.guard.GuardedSink`, so a sink that raises or hangs is reported once and never
stops training: sink authors do not need their own try/except around every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
